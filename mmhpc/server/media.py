"""Media inputs of a request: fetch (http/https, data:, local files), check, decode.

Safety rules (each has a row in tests/test_hostile.py):
- http(s): every hop's host is resolved HERE, every resolved address checked (private, loopback,
  link-local, multicast, reserved, unspecified; IPv4-mapped / 6to4 / NAT64 IPv6 unwrapped), and
  the connection goes to exactly those checked addresses through a pinned resolver, so a DNS
  answer cannot change between check and connect. Redirects are followed by hand, each hop
  re-checked. Bodies are streamed and cut at the byte cap; the whole fetch has a deadline.
- local files (file:// or a bare path) only below `media.allowed_local_path`, after realpath.
- images: JPEG/PNG/WebP/GIF only; the pixel count is read from the header BEFORE decoding.
- embeddings (.pt/.pth/.bin/.safetensors): size-capped, `torch.load(weights_only=True)` (no
  pickle code runs), shape [n, hidden] or [1, n, hidden], floating, finite → float32. A
  DeepStack model (Qwen3-VL, L levels) needs its L feature blocks too: `deepstack_embeddings`
  [L, n, hidden] beside `mm_embeddings`, or `mm_embeddings` [n, (1 + L) * hidden] (vLLM's
  layout); the loaded tensor is that bundle.
Decoding runs in the loader's own threads (media.max_decode_threads of them: a burst of large
images queues there instead of starving the event loop and every other thread), never on the
event loop. Hashing is the processor's job (once, over decoded content), in the same threads.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import binascii
import io
import ipaddress
import json
import os
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from PIL import Image, UnidentifiedImageError
from yarl import URL

from mmhpc.config import MediaConfig
from mmhpc.server.protocol import APIError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
IMAGE_MIMES = {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/gif"}
EMBEDDING_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def media_error(message: str, param: Optional[str] = None, code: str = "invalid_media") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Embeddings:
    """A pre-computed embeddings file: `tensor` [num_tokens, (1 + L) * hidden] float32 (L:
    the model's DeepStack levels, mostly 0), plus the file's other entries (e.g.
    image_grid_thw) as auxiliary data."""
    tensor: Any
    aux: dict = field(default_factory=dict)
    source: str = ""
    # How a disaggregated frontend ships the file to the rank that loads it again (tensors
    # never ride ZeroMQ): a local file by its resolved path, a fetched one by its bytes.
    local_path: str = ""
    data: bytes = field(default=b"", repr=False)

    def processor_input(self) -> dict:
        """The processor's input: {"embeddings", "grid_thw" (None: the default), "file"}; the
        grid comes from the file's grid_thw / image_grid_thw entry (Qwen2-VL M-RoPE)."""
        grid = self.aux.get("grid_thw", self.aux.get("image_grid_thw"))
        if grid is not None:
            try:
                grid = tuple(int(x) for x in (grid.reshape(-1).tolist()
                                              if hasattr(grid, "reshape") else grid))
            except (TypeError, ValueError):
                grid = ()
            if len(grid) != 3:
                raise media_error("embeddings file: grid_thw must be 3 integers",
                                  code="invalid_embeddings")
        return {"embeddings": self.tensor, "grid_thw": grid, "file": self}


MediaItem = Union[Image.Image, Embeddings]


def text_hidden_size(model_path: str | os.PathLike) -> Optional[int]:
    """The language model's hidden size from a checkpoint's config.json (None if unreadable)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") or {}
    return text.get("hidden_size") or cfg.get("hidden_size")


def deepstack_levels(model_path: str | os.PathLike) -> int:
    """The DeepStack levels L of a checkpoint's config.json (Qwen3-VL; 0: none or unreadable)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return len((cfg.get("vision_config") or {}).get("deepstack_visual_indexes") or ())


# ----------------------------------------------------------------------------- addresses
def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a public unicast address. IPv6 forms that embed IPv4 are judged by the IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return address_allowed(inner) and address_allowed_v6_shell(ip)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified
                                 or ip.is_loopback or ip.is_link_local or ip.is_private)


def address_allowed_v6_shell(ip: ipaddress.IPv6Address) -> bool:
    # The IPv6 wrapper itself must not be loopback/unspecified (::ffff:0:0/96 is 'private').
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local)


class _PinnedResolver(AbstractResolver):
    """Answers only for hosts the fetcher has resolved and checked itself."""

    def __init__(self) -> None:
        self.pins: dict[str, list[dict]] = {}

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        try:
            return self.pins[_host_key(host)]
        except KeyError:
            raise OSError(f"host {host!r} was not resolved by the media fetcher") from None

    async def close(self) -> None:
        pass


def _host_key(host: str) -> str:
    return host.lower().rstrip(".")


# ----------------------------------------------------------------------------- loader
class MediaLoader:
    """Turns the URLs of a request into PIL images / Embeddings, or raises APIError(400)."""

    def __init__(self, cfg: MediaConfig, hidden_size: Optional[int] = None,
                 max_tokens: int = 1 << 20, deepstack: int = 0) -> None:
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.deepstack = deepstack
        self.max_tokens = max_tokens
        self.image_cap = int(cfg.max_image_mb * (1 << 20))
        self.file_cap = int(cfg.max_file_size_mb * (1 << 20))
        # (ip, port) pairs exempt from the private-address rule (an internal image store).
        self.trusted: set[tuple[str, int]] = set()
        self.pool = ThreadPoolExecutor(cfg.max_decode_threads, thread_name_prefix="mmhpc-media")

    async def run(self, fn, *args):
        """`fn(*args)` in the media threads (decode, preprocess, hash)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(fn, *args))

    def address_ok(self, ip, port: int) -> bool:
        return (self.cfg.allow_private_urls or (str(ip), port) in self.trusted
                or address_allowed(ip))

    async def load_all(self, refs: list[tuple[str, str]]) -> list[MediaItem]:
        """refs: (url, param) pairs; fetched concurrently, returned in order."""
        return list(await asyncio.gather(*(self.load(u, p) for u, p in refs)))

    async def load(self, url: str, param: Optional[str] = None) -> MediaItem:
        if url.startswith("data:"):         # base64 of MBs: validated and decoded off the loop
            return await self.run(self._data_image, url, param)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            is_emb = parts.path.lower().endswith(EMBEDDING_SUFFIXES)
            data = await self._fetch(url, self.file_cap if is_emb else self.image_cap, param)
            name = parts.path
        elif scheme == "file" or (scheme == "" and url):
            if scheme == "file":
                if parts.netloc not in ("", "localhost"):
                    raise media_error(f"file URL with a host is not allowed: {url!r}", param)
                path = unquote(parts.path)
            else:
                path = url
            is_emb = path.lower().endswith(EMBEDDING_SUFFIXES)
            real, data = await self.run(self._read_local, path,
                                        self.file_cap if is_emb else self.image_cap, param)
            name = path
        else:
            raise media_error(f"unsupported URL scheme {parts.scheme!r} (http, https, data, file)",
                              param, code="unsupported_url_scheme")
        if is_emb:
            emb = await self.run(load_embeddings, data, name, self.hidden_size,
                                 self.max_tokens, param, self.deepstack)
            if scheme in ("http", "https"):
                emb.data = data
            else:
                emb.local_path = real
            return emb
        return await self.run(decode_image, data, self.cfg.max_image_pixels, param)

    # -- data: URLs
    def _data_image(self, url: str, param: Optional[str]) -> Image.Image:
        return decode_image(self._data_url(url, param)[1], self.cfg.max_image_pixels, param)

    def _data_url(self, url: str, param: Optional[str]) -> tuple[str, bytes]:
        head, sep, payload = url[5:].partition(",")
        if not sep:
            raise media_error("malformed data URL (no ',')", param)
        fields = [f.strip().lower() for f in head.split(";")]
        mime = fields[0]
        if mime not in IMAGE_MIMES:
            raise media_error(f"unsupported media type {mime!r} in data URL "
                              f"(jpeg, png, webp, gif)", param, code="unsupported_media_type")
        if "base64" not in fields[1:]:
            raise media_error("data URL must be base64-encoded", param)
        if len(payload) * 3 // 4 > self.image_cap:
            raise media_error(f"image is larger than {self.cfg.max_image_mb} MB", param,
                              code="media_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise media_error(f"invalid base64 in data URL: {e}", param) from None
        return mime, data

    # -- local files
    def _read_local(self, path: str, cap: int, param: Optional[str]) -> tuple[str, bytes]:
        return read_local_file(self.cfg.allowed_local_path, path, cap, param)

    # -- http(s)
    async def _pin(self, resolver: _PinnedResolver, url: URL, param: Optional[str]) -> None:
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise media_error(f"unsupported URL {str(url)!r}", param, code="unsupported_url_scheme")
        host = url.raw_host.strip("[]")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            literal = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            literal = None
        if literal is not None:
            addrs = [(literal, socket.AF_INET6 if literal.version == 6 else socket.AF_INET)]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as e:
                raise media_error(f"cannot resolve host {host!r}: {e}", param,
                                  code="media_fetch_failed") from None
            addrs = [(ipaddress.ip_address(i[4][0].split("%")[0]), i[0]) for i in infos]
            if not addrs:
                raise media_error(f"host {host!r} has no address", param, code="media_fetch_failed")
        for ip, _ in addrs:
            if not self.address_ok(ip, port):
                raise media_error(f"URL host {host!r} resolves to a non-public address "
                                  f"({ip}); refused", param, code="url_refused")
        resolver.pins[_host_key(host)] = [
            {"hostname": host, "host": str(ip), "port": port, "family": fam, "proto": 0,
             "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV} for ip, fam in addrs]

    async def _fetch(self, url: str, cap: int, param: Optional[str]) -> bytes:
        try:
            cur = URL(url)
        except (ValueError, TypeError) as e:
            raise media_error(f"invalid URL: {e}", param) from None
        resolver = _PinnedResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.cfg.fetch_timeout_s)
        headers = {"Accept-Encoding": "identity", "User-Agent": "mmhpc-media/1"}
        try:
            async with asyncio.timeout(self.cfg.fetch_timeout_s), aiohttp.ClientSession(
                    connector=connector, timeout=timeout, auto_decompress=False,
                    trust_env=False) as session:
                for _ in range(self.cfg.max_redirects + 1):
                    await self._pin(resolver, cur, param)
                    async with session.get(cur, allow_redirects=False, headers=headers) as r:
                        if r.status in REDIRECTS:
                            loc = r.headers.get("Location")
                            if not loc:
                                raise media_error(f"redirect without Location from {cur}", param,
                                                  code="media_fetch_failed")
                            cur = cur.join(URL(loc))
                            continue
                        if r.status != 200:
                            raise media_error(f"fetching {url!r} returned HTTP {r.status}", param,
                                              code="media_fetch_failed")
                        if r.content_length is not None and r.content_length > cap:
                            raise media_error(f"{url!r} is {r.content_length} bytes; the limit "
                                              f"is {cap}", param, code="media_too_large")
                        buf = bytearray()
                        async for chunk in r.content.iter_chunked(1 << 16):
                            buf += chunk
                            if len(buf) > cap:
                                raise media_error(f"{url!r} is larger than {cap} bytes", param,
                                                  code="media_too_large")
                        return bytes(buf)
                raise media_error(f"more than {self.cfg.max_redirects} redirects fetching {url!r}",
                                  param, code="media_fetch_failed")
        except APIError:
            raise
        except TimeoutError:
            raise media_error(f"fetching {url!r} timed out after {self.cfg.fetch_timeout_s}s",
                              param, code="media_fetch_timeout") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise media_error(f"fetching {url!r} failed: {type(e).__name__}: {e}", param,
                              code="media_fetch_failed") from None


# ----------------------------------------------------------------------------- local files
def read_local_file(root: str, path: str, cap: int,
                    param: Optional[str] = None) -> tuple[str, bytes]:
    """(real path, bytes) of a local file below `root` (media.allowed_local_path): resolved
    (links, ..) and checked to stay inside, opened without following a final link, a regular
    file, at most `cap` bytes. Any rank that reads a client's file goes through here."""
    if not root:
        raise media_error("local files are not allowed on this server "
                          "(media.allowed_local_path is empty)", param, code="local_file_refused")
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, path))
    if os.path.commonpath([real, root_real]) != root_real:
        raise media_error(f"path {path!r} is outside the allowed directory", param,
                          code="local_file_refused")
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise media_error(f"cannot open {path!r}: {e.strerror}", param) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise media_error(f"{path!r} is not a regular file", param)
        if st.st_size > cap:
            raise media_error(f"file {path!r} is {st.st_size} bytes; the limit is {cap}",
                              param, code="media_too_large")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise media_error(f"file {path!r} is larger than {cap} bytes", param,
                          code="media_too_large")
    return real, data


# ----------------------------------------------------------------------------- decoders
def decode_image(data: bytes, max_pixels: int, param: Optional[str] = None) -> Image.Image:
    """Bytes → RGB image. The header's size is checked before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise media_error(f"image too large: {e}", param, code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise media_error("not a supported image (JPEG, PNG, WebP or GIF)", param,
                          code="invalid_image") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise media_error(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", param,
                          code="image_too_large")
    try:
        img.seek(0)                   # GIF / animated WebP: the first frame
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise media_error(f"corrupt or truncated image: {e}", param, code="invalid_image") from None


def load_embeddings(data: bytes, name: str, hidden_size: Optional[int], max_tokens: int,
                    param: Optional[str] = None, deepstack: int = 0) -> Embeddings:
    """A .pt/.pth/.bin (torch.save, weights_only) or .safetensors file → Embeddings; a
    DeepStack model's (`deepstack` levels) as the [n, (1 + L) * hidden] bundle."""
    import torch
    aux: dict = {}
    if name.lower().endswith(".safetensors"):
        from safetensors.torch import load as st_load
        try:
            tensors = st_load(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's file
            raise media_error(f"invalid safetensors file: {e}", param,
                              code="invalid_embeddings") from None
        if "mm_embeddings" in tensors:
            tensor = tensors.pop("mm_embeddings")
            aux = tensors
        elif len(tensors) == 1:
            tensor = next(iter(tensors.values()))
        else:
            raise media_error("safetensors file needs an 'mm_embeddings' tensor (or exactly one "
                              "tensor)", param, code="invalid_embeddings")
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle payloads land here, unexecuted
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise media_error(f"embeddings file refused (only plain tensors load, no pickled "
                              f"code): {msg}", param, code="invalid_embeddings") from None
        if isinstance(obj, dict) and "mm_embeddings" in obj:
            tensor = obj["mm_embeddings"]
            aux = {k: v for k, v in obj.items() if k != "mm_embeddings"}
        else:
            tensor = obj
    if not isinstance(tensor, torch.Tensor):
        raise media_error("embeddings file must hold a tensor or a dict with 'mm_embeddings'",
                          param, code="invalid_embeddings")
    if not tensor.is_floating_point():
        raise media_error(f"embeddings must be floating point, got {tensor.dtype}", param,
                          code="invalid_embeddings")
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2 or tensor.shape[0] < 1:
        raise media_error(f"embeddings must have shape [n, hidden] or [1, n, hidden], got "
                          f"{list(tensor.shape)}", param, code="invalid_embeddings")
    if deepstack:
        tensor = _with_deepstack(tensor, aux.pop("deepstack_embeddings", None), hidden_size,
                                 deepstack, param)
    elif "deepstack_embeddings" in aux:
        raise media_error("embeddings file has deepstack_embeddings, but this model has no "
                          "DeepStack", param, code="invalid_embeddings")
    if hidden_size is not None and tensor.shape[1] != hidden_size * (1 + deepstack):
        levels = f" x (1 + {deepstack} DeepStack levels)" if deepstack else ""
        raise media_error(f"embeddings hidden size {tensor.shape[1]} != the model's "
                          f"{hidden_size}{levels}", param, code="invalid_embeddings")
    if tensor.shape[0] > max_tokens:
        raise media_error(f"{tensor.shape[0]} embedding rows exceed the context length "
                          f"{max_tokens}", param, code="invalid_embeddings")
    tensor = tensor.to(torch.float32).contiguous()
    if not torch.isfinite(tensor).all():
        raise media_error("embeddings contain NaN or Inf", param, code="invalid_embeddings")
    return Embeddings(tensor, aux, name)


def _with_deepstack(tensor, deep, hidden_size: Optional[int], levels: int, param):
    """The [n, (1 + L) * hidden] bundle of a DeepStack model's file: `mm_embeddings` already
    that wide, or [n, hidden] and `deepstack_embeddings` [L, n, hidden] (a tensor, or a list
    of L [n, hidden] tensors in a .pt dict)."""
    import torch
    n, width = tensor.shape
    if hidden_size is None or width == hidden_size * (1 + levels):
        if deep is not None:
            raise media_error("embeddings file has both a full-width mm_embeddings and "
                              "deepstack_embeddings", param, code="invalid_embeddings")
        return tensor
    if deep is None:
        raise media_error(f"this model injects DeepStack features ({levels} levels) into its "
                          f"first decoder layers: the embeddings file needs "
                          f"'deepstack_embeddings' [{levels}, {n}, {width}] beside "
                          f"'mm_embeddings', or mm_embeddings [{n}, {(1 + levels) * width}]",
                          param, code="missing_deepstack")
    if isinstance(deep, (list, tuple)) and all(isinstance(d, torch.Tensor) for d in deep):
        deep = torch.stack(deep) if deep else torch.empty(0)
    if not isinstance(deep, torch.Tensor) or not deep.is_floating_point() \
            or tuple(deep.shape) != (levels, n, width):
        shape = list(deep.shape) if isinstance(deep, torch.Tensor) else type(deep).__name__
        raise media_error(f"deepstack_embeddings must be floating [{levels}, {n}, {width}], "
                          f"got {shape}", param, code="invalid_embeddings")
    return torch.cat([tensor.to(torch.float32), *deep.to(torch.float32).unbind(0)], dim=1)
