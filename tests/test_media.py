"""Media loader units (no engine, no frontend): address policy, image decode caps, embeddings
files (incl. a real pickle payload), local-path confinement, http fetch rules against a
127.0.0.1 server started here."""
from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import os

import pytest
import torch
from PIL import Image

from conftest import CodeRunningPickle
from imgserver import ImageServer
from mmhpc.config import MediaConfig
from mmhpc.server.media import (Embeddings, MediaLoader, address_allowed, decode_image,
                                load_embeddings)
from mmhpc.server.protocol import APIError

HIDDEN = 32


def png(w: int = 8, h: int = 8, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    b = io.BytesIO()
    Image.new(mode, (w, h), 128 if mode != "RGB" else (10, 200, 30)).save(b, fmt)
    return b.getvalue()


def code_of(coro_or_fn) -> str:
    with pytest.raises(APIError) as e:
        if asyncio.iscoroutine(coro_or_fn):
            asyncio.run(coro_or_fn)
        else:
            coro_or_fn()
    assert e.value.status == 400 and e.value.body()["error"]["message"]
    return e.value.code


@pytest.mark.parametrize("addr, ok", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("0.0.0.0", False),
    ("100.64.0.1", False), ("224.0.0.1", False), ("255.255.255.255", False), ("240.0.0.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("2002:7f00:1::", False),
    ("64:ff9b::a00:1", False),
])
def test_address_policy(addr, ok):
    assert address_allowed(ipaddress.ip_address(addr)) is ok


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_decode_formats(fmt):
    img = decode_image(png(9, 7, fmt), 1000)
    assert img.size == (9, 7) and img.mode == "RGB"


def test_decode_rejects():
    assert code_of(lambda: decode_image(png(2000, 2000, mode="1"), 1_000_000)) == "image_too_large"
    assert code_of(lambda: decode_image(png(64, 64)[:60], 10**6)) == "invalid_image"
    assert code_of(lambda: decode_image(png(8, 8, "BMP"), 10**6)) == "invalid_image"
    assert code_of(lambda: decode_image(b"hello world, not an image", 10**6)) == "invalid_image"


def _saved(obj) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def test_embeddings_files():
    t = torch.randn(5, HIDDEN, dtype=torch.float16)
    e = load_embeddings(_saved(t), "x.pt", HIDDEN, 100)
    assert e.tensor.dtype == torch.float32 and e.tensor.shape == (5, HIDDEN)
    e = load_embeddings(_saved({"mm_embeddings": t[None], "grid_thw": torch.tensor([1, 2, 10])}),
                        "x.pth", HIDDEN, 100)
    assert e.tensor.shape == (5, HIDDEN) and e.aux["grid_thw"].tolist() == [1, 2, 10]
    from safetensors.torch import save
    e = load_embeddings(save({"mm_embeddings": t.bfloat16().contiguous(), "extra": t[:1]}),
                        "x.safetensors", HIDDEN, 100)
    assert e.tensor.shape == (5, HIDDEN) and "extra" in e.aux
    bad = [(_saved(torch.randn(5, HIDDEN + 1)), "x.pt"), (_saved(torch.ones(5, HIDDEN).long()), "x.pt"),
           (_saved(torch.randn(HIDDEN)), "x.pt"), (_saved(torch.randn(2, 3, HIDDEN)), "x.pt"),
           (_saved(torch.full((2, HIDDEN), float("nan"))), "x.pt"), (_saved(torch.randn(101, HIDDEN)), "x.pt"),
           (_saved({"other": torch.randn(2, HIDDEN)}), "x.pt"), (b"garbage", "x.pt"),
           (b"garbage", "x.safetensors")]
    for data, name in bad:
        assert code_of(lambda: load_embeddings(data, name, HIDDEN, 100)) == "invalid_embeddings"


def test_deepstack_embeddings_files():
    """A DeepStack model (2 levels): `deepstack_embeddings` [L, n, hidden] beside
    `mm_embeddings` (.pt dict: a tensor or a list; .safetensors), or one [n, 3 * hidden] tensor,
    all load to the same bundle; a file without them is a 400 that names them."""
    from safetensors.torch import save
    t, deep = torch.randn(5, HIDDEN), torch.randn(2, 5, HIDDEN)
    bundle = torch.cat([t, deep[0], deep[1]], dim=1)
    files = [(_saved({"mm_embeddings": t, "deepstack_embeddings": deep}), "x.pt"),
             (_saved({"mm_embeddings": t, "deepstack_embeddings": list(deep)}), "x.pt"),
             (save({"mm_embeddings": t, "deepstack_embeddings": deep}), "x.safetensors"),
             (save({"mm_embeddings": bundle}), "x.safetensors"), (_saved(bundle), "x.pt")]
    for data, name in files:
        assert torch.equal(load_embeddings(data, name, HIDDEN, 100, deepstack=2).tensor, bundle)
    with pytest.raises(APIError) as e:
        load_embeddings(_saved({"mm_embeddings": t}), "x.pt", HIDDEN, 100, deepstack=2)
    assert e.value.status == 400 and e.value.code == "missing_deepstack"
    assert "deepstack_embeddings" in e.value.body()["error"]["message"]
    assert code_of(lambda: load_embeddings(save({"mm_embeddings": t}), "x.safetensors", HIDDEN,
                                           100, deepstack=2)) == "missing_deepstack"
    bad = [{"mm_embeddings": t, "deepstack_embeddings": deep[:1]},
           {"mm_embeddings": t, "deepstack_embeddings": deep.long()},
           {"mm_embeddings": t, "deepstack_embeddings": "no"},
           {"mm_embeddings": bundle, "deepstack_embeddings": deep}]
    for obj in bad:
        assert code_of(lambda: load_embeddings(_saved(obj), "x.pt", HIDDEN, 100,
                                               deepstack=2)) == "invalid_embeddings"
    # a model without DeepStack refuses the blocks rather than ignoring them
    assert code_of(lambda: load_embeddings(_saved({"mm_embeddings": t, "deepstack_embeddings":
                                                   deep}), "x.pt", HIDDEN, 100)) == "invalid_embeddings"


def test_pickle_payload_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    data = _saved({"mm_embeddings": torch.randn(2, HIDDEN), "x": CodeRunningPickle(str(marker))})
    assert code_of(lambda: load_embeddings(data, "evil.pt", HIDDEN, 100)) == "invalid_embeddings"
    assert not marker.exists()
    torch.load(io.BytesIO(data), weights_only=False)      # the payload is real
    assert marker.exists()


def test_local_files(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "a.png", root / "inner.png")
    torch.save(torch.randn(3, HIDDEN), root / "e.pt")
    (root / "big.pt").write_bytes(b"\0" * (2 << 20))
    cfg = MediaConfig(allowed_local_path=str(root), max_file_size_mb=1)
    m = MediaLoader(cfg, HIDDEN)
    assert asyncio.run(m.load(str(root / "a.png"))).size == (8, 8)
    assert asyncio.run(m.load(f"file://{root}/inner.png")).size == (8, 8)
    assert isinstance(asyncio.run(m.load("e.pt")), Embeddings)
    for url in [str(tmp_path / "secret.png"), f"{root}/../secret.png", "file:///etc/passwd",
                str(root / "link.png"), "../secret.png"]:
        assert code_of(m.load(url)) == "local_file_refused", url
    assert code_of(m.load(str(root / "big.pt"))) == "media_too_large"
    assert code_of(m.load(str(root / "missing.png"))) == "invalid_media"
    assert code_of(m.load("file://otherhost/x.png")) == "invalid_media"
    refuse = MediaLoader(MediaConfig(), HIDDEN)
    assert code_of(refuse.load(str(root / "a.png"))) == "local_file_refused"


def test_data_urls():
    m = MediaLoader(MediaConfig(max_image_mb=0.01), HIDDEN)
    good = base64.b64encode(png()).decode()
    assert asyncio.run(m.load(f"data:image/png;base64,{good}")).size == (8, 8)
    assert code_of(m.load(f"data:image/png;base64,{good[:-3]}")) == "invalid_media"
    assert code_of(m.load(f"data:image/png;base64,{good[:40]}")) == "invalid_image"
    assert code_of(m.load(f"data:image/png;base64,{good}!!")) == "invalid_media"
    assert code_of(m.load(f"data:text/html;base64,{good}")) == "unsupported_media_type"
    assert code_of(m.load("data:image/png,rawbytes")) == "invalid_media"
    big = base64.b64encode(os.urandom(20000)).decode()
    assert code_of(m.load(f"data:image/png;base64,{big}")) == "media_too_large"
    assert code_of(m.load("ftp://example.com/a.png")) == "unsupported_url_scheme"


@pytest.fixture(scope="module")
def srv():
    s = ImageServer().start()
    s.add("/a.png", png(), content_type="image/png")
    s.add("/e.pt", _saved(torch.randn(4, HIDDEN)))
    s.add("/big", os.urandom(300_000))
    s.add("/big-nolen", os.urandom(300_000), send_length=False)
    s.add("/slow", png(), delay_s=2.0)
    s.add("/to-a", status=302, headers={"Location": "/a.png"})
    s.add("/to-meta", status=302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
    s.add("/to-loop", status=302, headers={"Location": "/to-loop"})
    yield s
    s.stop()


def test_fetch(srv):
    m = MediaLoader(MediaConfig(allow_private_urls=True, max_image_mb=0.1, fetch_timeout_s=1.0),
                    HIDDEN)
    assert asyncio.run(m.load(srv.url("/a.png"))).size == (8, 8)
    assert asyncio.run(m.load(srv.url("/to-a"))).size == (8, 8)
    assert asyncio.run(m.load(srv.url("/e.pt"))).tensor.shape == (4, HIDDEN)
    assert code_of(m.load(srv.url("/big"))) == "media_too_large"
    assert code_of(m.load(srv.url("/big-nolen"))) == "media_too_large"
    assert code_of(m.load(srv.url("/missing"))) == "media_fetch_failed"
    assert code_of(m.load(srv.url("/to-loop"))) == "media_fetch_failed"
    assert code_of(m.load(srv.url("/slow"))) == "media_fetch_timeout"


def test_fetch_refuses_private(srv):
    m = MediaLoader(MediaConfig(), HIDDEN)
    p = srv.port
    hits = srv.hits.get("/a.png", 0)
    for url in [srv.url("/a.png"), f"http://localhost:{p}/a.png", f"http://[::1]:{p}/a.png",
                f"http://[::ffff:127.0.0.1]:{p}/a.png", f"http://2130706433:{p}/a.png",
                f"http://0x7f000001:{p}/a.png", f"http://0.0.0.0:{p}/a.png",
                "http://10.0.0.1/a.png", "http://169.254.169.254/latest/meta-data"]:
        assert code_of(m.load(url)) == "url_refused", url
    assert srv.hits.get("/a.png", 0) == hits          # refused before connecting
    # A trusted first hop whose redirect points at the metadata address: refused at hop 2.
    m.trusted.add(("127.0.0.1", p))
    assert asyncio.run(m.load(srv.url("/a.png"))).size == (8, 8)
    assert code_of(m.load(srv.url("/to-meta"))) == "url_refused"


def test_qwen_embeddings_grid_reaches_processor(tiny_qwen2_vl):
    from mmhpc.multimodal.processor import InputProcessor
    from mmhpc.server.app import Frontend
    from mmhpc.server.media import text_hidden_size
    proc = InputProcessor(tiny_qwen2_vl)
    hidden, m = text_hidden_size(tiny_qwen2_vl), proc.merge_size
    data = _saved({"mm_embeddings": torch.randn(1, 6, hidden),
                   "image_grid_thw": torch.tensor([[1, 2 * m, 3 * m]])})
    e = load_embeddings(data, "q.pt", hidden, 100)
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    ids, items = proc.process(prompt, [Frontend._processor_input(e)])
    assert items[0].grid_thw == (1, 2 * m, 3 * m) and items[0].num_tokens == 6
    assert ids.count(proc.image_token_id) == 6
