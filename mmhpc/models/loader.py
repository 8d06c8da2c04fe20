"""Weights from a checkpoint's safetensors, one tensor at a time, by name mapping.

Each family lists prefix rewrites from checkpoint names (HF 5.x `model.language_model.…`,
legacy `language_model.model.…`) to its own parameter names. Tensors are read through
`safe_open(...).get_slice`, so a tensor-parallel rank reads only its shard: a parameter that
carries `tp_dim` is split along that dim into `tp_size` parts and rank `tp_rank` keeps one;
one that carries `weight_loader(slice_) -> tensor` reads its own part (MoE experts: only
this rank's experts).

Progress: inside `reporting(label)` (the launcher wraps each role's set-up in it), every
`load_weights` prints `mmhpc: LABEL: weights A of B (P%)` every PROGRESS_EVERY_S seconds (a bar
redrawn in place when stderr is a terminal) and a last line with the time taken.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def map_name(name: str, rules: list[tuple[str, str]], params: dict) -> str | None:
    """First matching prefix rule; the vision tower's optional `vision_model.` level is
    added or dropped to fit the model at hand (CLIPVisionModel differs across HF versions)."""
    for src, dst in rules:
        if name.startswith(src):
            name = dst + name[len(src):]
            break
    if name in params:
        return name
    for a, b in (("vision_tower.vision_model.", "vision_tower."), ("vision_tower.", "vision_tower.vision_model.")):
        if name.startswith(a) and b + name[len(a):] in params:
            return b + name[len(a):]
    return None


bytes_read = 0          # tensor bytes read by load_weights in this process (tests: shards)
PROGRESS_EVERY_S = 5.0
_label: str | None = None      # set by `reporting`: this rank prints its loads' progress


@contextlib.contextmanager
def reporting(label: str | None):
    """Print the progress of every `load_weights` inside, as `label` (None: silent)."""
    global _label
    prev, _label = _label, label
    try:
        yield
    finally:
        _label = prev


class _Progress:
    def __init__(self, label: str | None, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.t0 = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._say(f"loading weights, {_size(total)}")

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.label and (now - self.last >= (0.2 if self.tty else PROGRESS_EVERY_S)):
            self.last = now
            pct = 100 * self.done / max(self.total, 1)
            bar = "#" * int(pct / 5)
            self._say(f"weights {_size(self.done)} of {_size(self.total)} ({pct:.0f}%)"
                      + (f" [{bar:<20}]" if self.tty else ""), end="\r" if self.tty else "\n")

    def finish(self) -> None:
        self._say(f"weights loaded, {_size(self.done)} in {time.monotonic() - self.t0:.1f} s"
                  + (" " * 20 if self.tty else ""))

    def _say(self, text: str, end: str = "\n") -> None:
        if self.label:
            print(f"mmhpc: {self.label}: {text}", end=end, file=sys.stderr, flush=True)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _read_shard(slice_, param: torch.Tensor, shard) -> torch.Tensor:
    """A parameter's `tp_shard` (mmhpc.distributed.parallel.Shard) of the checkpoint tensor,
    zero-padded up to the parameter's size (vocabulary not divisible by tp)."""
    shape = slice_.get_shape()
    start, end = shard.bounds(shape[shard.dim])
    index = [slice(None)] * len(shape)
    index[shard.dim] = slice(start, end)
    tensor = slice_[tuple(index)]
    if tensor.shape[shard.dim] < param.shape[shard.dim]:
        pad = list(tensor.shape)
        pad[shard.dim] = param.shape[shard.dim] - tensor.shape[shard.dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=shard.dim)
    return tensor


def _read(slice_, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    shard, own = getattr(param, "tp_shard", None), getattr(param, "weight_loader", None)
    if own is not None:                  # the parameter reads its own part (MoE experts)
        return own(slice_)
    if shard is not None:
        return _read_shard(slice_, param, shard)
    return _read_dim(slice_, param, tp_rank, tp_size)


def _count_read(nbytes: int, progress) -> None:
    global bytes_read
    bytes_read += nbytes
    if progress:
        progress.add(nbytes)


def _read_dim(slice_, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    dim = getattr(param, "tp_dim", None)
    if tp_size == 1 or dim is None:
        return slice_[:]
    size = slice_.get_shape()[dim] // tp_size
    index = [slice(None)] * len(slice_.get_shape())
    index[dim] = slice(tp_rank * size, (tp_rank + 1) * size)
    return slice_[tuple(index)]


_EXPERT_KEY = re.compile(r"^((?:.*\.)?experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _expert_target(key: str, rules: list[tuple[str, str]], params: dict
                   ) -> tuple[str | None, tuple[int, str] | None]:
    """A per-expert checkpoint tensor (`...experts.{e}.gate_proj.weight`, as Qwen3-MoE
    checkpoints store them): the fused expert parameter that holds expert e and (e, proj),
    for its `load_expert` (moe.FusedExperts: others' experts are not read); (None, None) if
    the key is no such tensor."""
    name = key
    for src, dst in rules:
        if name.startswith(src):
            name = dst + name[len(src):]
            break
    m = _EXPERT_KEY.match(name)
    if m is None:
        return None, None
    prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
    name = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
    if getattr(params.get(name), "load_expert", None) is None:
        return None, None
    return name, (expert, proj)


def load_weights(model: nn.Module, path: str | Path, rules: list[tuple[str, str]],
                 tp_rank: int = 0, tp_size: int = 1, tie_word_embeddings: bool = False) -> None:
    path = Path(path)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else [p.name for p in sorted(path.glob("*.safetensors"))]
    loaded: set[str] = set()
    progress = _Progress(_label, _bytes_to_read(path, files, rules, params)) if _label else None
    for key, slice_, name, expert in _mapped_slices(path, files, rules, params):
        param = params[name]
        if expert is not None:                          # one expert's tensor (per-expert files)
            nbytes = param.load_expert(*expert, slice_)
            _count_read(nbytes, progress)
            loaded.add(name)
            continue
        tensor = _read(slice_, param, tp_rank, tp_size)
        _count_read(tensor.numel() * tensor.element_size(), progress)
        if tensor.shape != param.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
        loaded.add(name)
    if progress:
        progress.finish()
    if tie_word_embeddings and "lm_head.weight" not in loaded:
        model.lm_head.weight = model.language_model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")


def _mapped_slices(path: Path, files: list[str], rules: list[tuple[str, str]], params: dict):
    """(checkpoint key, its safetensors slice, the parameter name, expert) of every mapped
    tensor; expert: (e, proj) for one expert's tensor of a fused parameter, else None."""
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            for key in f.keys():
                name, expert = map_name(key, rules, params), None
                if name is None:
                    name, expert = _expert_target(key, rules, params)
                if name is not None:
                    yield key, f.get_slice(key), name, expert


def _bytes_to_read(path: Path, files: list[str], rules: list[tuple[str, str]],
                   params: dict) -> int:
    """What this rank's `load_weights` will read, from the files' headers: each mapped
    parameter's own size (its TP shard, its experts) in the checkpoint's dtype."""
    sizes = {name: params[name].numel() * _DTYPE_BYTES.get(sl.get_dtype(), 4)
             for _, sl, name, _ in _mapped_slices(path, files, rules, params)}
    return sum(sizes.values())


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
