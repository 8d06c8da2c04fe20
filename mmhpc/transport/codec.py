"""One codec for every control message: msgpack of registered dataclasses, by type tag.

A registered dataclass packs as msgpack ext type 1 holding `[tag, {field: value}]`; nested
registered dataclasses (SamplingParams, NixlDescs, ...) pack the same way, so a message decodes
to the same classes it was built from. Decoding is strict: an unknown tag or field raises
CodecError. Tensors never ride this path (NIXL descriptors do).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, TypeVar

import msgpack

_EXT = 1
_REGISTRY: dict[str, type] = {}
T = TypeVar("T")


class CodecError(ValueError):
    pass


def register(cls: type[T] | None = None, *, tag: str | None = None) -> Any:
    """Class decorator (or call) adding a dataclass to the codec under `tag` (its name)."""
    def wrap(c: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(c):
            raise TypeError(f"{c.__name__} is not a dataclass")
        t = tag or c.__name__
        if _REGISTRY.get(t, c) is not c:
            raise CodecError(f"message tag {t!r} registered twice")
        _REGISTRY[t] = c
        c.__msg_tag__ = t  # type: ignore[attr-defined]
        return c
    return wrap(cls) if cls is not None else wrap


def _default(obj: Any) -> Any:
    tag = getattr(type(obj), "__msg_tag__", None)
    if tag is not None and _REGISTRY.get(tag) is type(obj):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return msgpack.ExtType(_EXT, msgpack.packb([tag, fields], default=_default,
                                                    use_bin_type=True))
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise CodecError(f"cannot encode {type(obj).__name__} (register the dataclass; "
                     f"tensors go over NIXL)")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _EXT:
        raise CodecError(f"unknown msgpack ext type {code}")
    tag, fields = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise CodecError(f"unknown message type {tag!r}")
    try:
        return cls(**fields)
    except TypeError as e:
        raise CodecError(f"bad fields for {tag}: {e}") from None


def encode(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, default=_default, use_bin_type=True)
    except (TypeError, ValueError) as e:
        if isinstance(e, CodecError):
            raise
        raise CodecError(str(e)) from None


def decode(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except CodecError:
        raise
    except Exception as e:  # msgpack raises several types on corrupt input
        raise CodecError(f"cannot decode message: {e}") from None


def encode_envelope(src: int, msg: Any) -> bytes:
    if _REGISTRY.get(getattr(type(msg), "__msg_tag__", "")) is not type(msg):
        raise CodecError(f"{type(msg).__name__} is not a registered message")
    return encode([src, msg])


def decode_envelope(data: bytes) -> tuple[int, Any]:
    out = decode(data)
    if not (isinstance(out, list) and len(out) == 2 and isinstance(out[0], int)
            and getattr(type(out[1]), "__msg_tag__", None)):
        raise CodecError("not an envelope [src_rank, message]")
    return out[0], out[1]


def registered() -> dict[str, type]:
    return dict(_REGISTRY)
