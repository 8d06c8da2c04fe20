"""The house rules that keep the structure what docs/ENGINE.md says, read from the source:
no import cycle inside `mmhpc`, a role reaches its engine only through its protocol in
`mmhpc.engine.interface`, and no role imports another role."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mmhpc"
ROLES = ("encode", "prefill", "decode", "aggregated", "frontend")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """mmhpc modules `path` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmhpc"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mmhpc"))
    return {m for m in out if m in modules}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m] - packages):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def _members(protocol) -> set[str]:
    names = set()
    for cls in protocol.__mro__:
        if cls.__module__ == "mmhpc.engine.interface":
            names |= set(getattr(cls, "__annotations__", {}))
            names |= {k for k, v in vars(cls).items() if callable(v) and not k.startswith("_")}
    return names


def _engine_uses(path: Path) -> set[str]:
    """X of every `self.engine.X` and `engine.X` (a variable named engine) in `path`."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if (isinstance(v, ast.Attribute) and v.attr == "engine" and isinstance(v.value, ast.Name)
                and v.value.id == "self") or (isinstance(v, ast.Name) and v.id == "engine"):
            out.add(node.attr)
    return out


@pytest.mark.parametrize("module,protocol", [
    ("roles/encode.py", "EncodeEngine"), ("roles/prefill.py", "PrefillEngine"),
    ("roles/decode.py", "DecodeEngine"), ("roles/aggregated.py", "AggregatedEngine"),
    ("roles/worker.py", "GenerateEngine"), ("roles/embed_pool.py", "EncodeEngine"),
    ("server/engine_client.py", "AggregatedEngine")])
def test_roles_use_only_their_engine_protocol(module, protocol):
    from mmhpc.engine import interface
    uses = _engine_uses(PKG / module)
    assert uses, f"{module}: no engine use found (is the check still reading it?)"
    assert uses <= _members(getattr(interface, protocol)), \
        f"{module} uses {sorted(uses - _members(getattr(interface, protocol)))} of its engine"


@pytest.mark.parametrize("role", ROLES)
def test_no_role_imports_another_role(role):
    modules = _modules()
    others = {f"mmhpc.roles.{r}" for r in ROLES if r != role}
    assert not _imports(PKG / "roles" / f"{role}.py", modules) & others


def test_roles_call_no_private_nixl_method():
    for path in (PKG / "roles").glob("*.py"):
        assert "nixl._" not in path.read_text(), path
