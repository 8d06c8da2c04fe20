"""`ImageItem` messages (what the frontend sends a worker) → `MMItem`s for an engine: images
decoded and preprocessed, pre-computed embeddings files loaded by the frontend's own rules.
Used by the encode, prefill (EP/D) and aggregated roles."""
from __future__ import annotations

from mmhpc.engine.sequence import MMItem
from mmhpc.messages.to_encode import ImageItem

EMBEDDING_FORMATS = ("embedding_file", "embedding_bytes")


def decode_image(item: ImageItem):
    from PIL import Image
    if item.format == "rgb":
        return Image.frombytes("RGB", (item.width, item.height), item.data)
    raise ValueError(f"image format {item.format!r} is not supported")


def load_embedding_item(processor, item: ImageItem, media_cfg, hidden_size: int,
                        max_tokens: int, deepstack: int = 0) -> MMItem:
    """A pre-computed embeddings file → MMItem with `embeddings` [n, hidden] float32 (a
    DeepStack model's: [n, (1 + deepstack) * hidden], media.load_embeddings), by the
    frontend's own rules: a local file re-checked against media.allowed_local_path and the
    size cap, loaded without pickle code, shape / dtype / hidden size checked, its grid (or the
    default) taken as the frontend did. The content hash must be the frontend's: a file that
    changed since the frontend read it fails its request (the caches key on that hash)."""
    from mmhpc.server.media import load_embeddings, read_local_file
    cap = int(media_cfg.max_file_size_mb * (1 << 20))
    if item.format == "embedding_file":
        _, data = read_local_file(media_cfg.allowed_local_path, item.path, cap)
    elif len(item.data) > cap:
        raise ValueError(f"embeddings file is {len(item.data)} bytes; the limit is {cap}")
    else:
        data = item.data
    emb = load_embeddings(data, item.path, hidden_size, max_tokens, deepstack=deepstack)
    mm = processor.embedding_item(emb.processor_input())
    if mm.content_hash != item.content_hash:
        raise ValueError(f"embeddings file {item.path!r} changed since the frontend read it")
    if mm.num_tokens != item.num_tokens:
        raise ValueError(f"embeddings file has {mm.num_tokens} rows here, the frontend "
                         f"counted {item.num_tokens}")
    mm.offset = item.offset
    return mm


def media_item(processor, item: ImageItem, config, hidden_size: int,
               deepstack: int = 0) -> MMItem:
    """An ImageItem → MMItem ready for the engine: an image preprocessed (pixel values, grid)
    or an embeddings file loaded (see load_embedding_item). Offset from the item."""
    if item.format in EMBEDDING_FORMATS:
        return load_embedding_item(processor, item, config.media, hidden_size,
                                   config.model.max_model_len, deepstack)
    mm = processor.image_item(decode_image(item))
    mm.offset = item.offset
    return mm
