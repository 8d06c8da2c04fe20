"""Prompt + images → token ids with expanded image placeholders and one `MMItem` per image.

Loads only the tokenizer and the image processor config of a Hugging Face checkpoint (no
weights). The ids match HF's own processor (`AutoProcessor(text=..., images=...)`) token for
token: each placeholder token (`<image>` for LLaVA, `<|image_pad|>` for Qwen2-VL) becomes
`num_tokens` copies of itself, starting at `MMItem.offset`; Llama-4's `<|image|>` becomes the
image's whole tiled span (mmhpc/multimodal/tiles.py), `grid_thw = (1, rows, cols)`.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from mmhpc.engine.sequence import MMItem
from mmhpc.models.registry import processor_kind


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _smart_resize():
    try:    # transformers >= 5.2x: PIL backend module (no torchvision import)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def image_hash(image) -> str:
    """sha256 over the decoded RGB pixels and the size: same picture, same hash, any encoding."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"rgb:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def tensor_hash(tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes."""
    import torch

    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# NumPy, not torch: one thread each, the GIL released in the array operations (torch's CPU ops
# would start intra-op threads in every preprocessing thread and crowd the engine's thread).

def _pixels_pil_backend(x, ip):
    """transformers' PIL/NumPy backend: uint8 → float64 × rescale_factor → float32, then
    (x − mean) / std in float32. x: [H, W, 3] uint8 array."""
    import numpy as np
    x = (x.astype(np.float64) * ip.rescale_factor).astype(np.float32)
    return (x - np.array(ip.image_mean, dtype=np.float32)) / np.array(ip.image_std,
                                                                       dtype=np.float32)


def _pixels_fused(x, ip):
    """transformers' torch backend: rescale folded into mean and std (float32 × 1/factor),
    then (x − mean) / std on the float32 pixels."""
    import numpy as np
    mean = np.array(ip.image_mean, dtype=np.float32) * np.float32(1.0 / ip.rescale_factor)
    std = np.array(ip.image_std, dtype=np.float32) * np.float32(1.0 / ip.rescale_factor)
    return (x.astype(np.float32) - mean) / std


_FORMULAS = (_pixels_pil_backend, _pixels_fused)
_UNSET = object()
_FIRST_USE = threading.Lock()       # the server preprocesses in worker threads


def pixel_formula(image_processor):
    """The way of `_FORMULAS` bit-equal to this processor (checked on first use; None: none)."""
    return getattr(image_processor, "_mmhpc_pixels", (_UNSET, None))[0]


def _check_formula(ip, side: int) -> tuple:
    """(formula, its per-byte table) for this processor, or (None, None): checked against the
    processor itself on a random image."""
    import numpy as np
    from PIL import Image
    probe = Image.fromarray(np.random.default_rng(0).integers(
        0, 256, (side, side, 3), dtype=np.uint8))
    ref = ip(images=[probe], return_tensors="pt")["pixel_values"]
    x = _rgb_array(probe)
    formula = next((f for f in _FORMULAS if _torch_equal(_chw(f(x, ip)), ref)), None)
    if formula is None:
        return None, None
    byte = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)    # [256, 3]
    lut = formula(byte, ip)
    assert _torch_equal(_apply_lut(lut, x), ref)
    return formula, lut


def _fast_applies(ip, image) -> bool:
    if not type(ip).__name__.startswith("CLIPImageProcessor"):
        return False
    side = _get(getattr(ip, "size", None) or {}, "shortest_edge")
    crop = getattr(ip, "crop_size", None) or {}
    return bool(getattr(ip, "do_resize", False) and getattr(ip, "do_center_crop", False)
                and getattr(ip, "do_rescale", False) and getattr(ip, "do_normalize", False)
                and not getattr(ip, "do_pad", False) and side is not None
                and image.width == image.height == side == _get(crop, "height")
                == _get(crop, "width") and (image.mode == "RGB"
                                            or getattr(ip, "do_convert_rgb", True)))


def _rgb_array(image):
    import numpy as np
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))   # [H, W, 3] u8


def _chw(x):
    import numpy as np
    import torch
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _apply_lut(lut, x):
    """[1, 3, H, W] float32 from [H, W, 3] uint8 through per-channel tables [256, 3]: the
    formula's result for every possible byte, so the same values in one pass."""
    import numpy as np
    import torch
    out = np.empty((3,) + x.shape[:2], dtype=np.float32)
    for c in range(3):
        np.take(lut[:, c], x[:, :, c], out=out[c])
    return torch.from_numpy(out)[None]


def fast_pixel_values(image_processor, image):
    """A CLIP-style processor's pixel values ([1, 3, H, W] float32) for an image that is
    already its output size (square, side = shortest_edge = crop size), where resize and
    center crop change nothing: only the rescale and normalize, as the processor computes
    them, so the same values bit for bit — tabulated for the 256 byte values, one lookup
    pass per image — without the processor's per-call overhead (it also holds the GIL less,
    which the thread launching GPU work notices).
    transformers versions compute them differently: on first use per processor the known
    ways are checked against the processor itself on a random image, and the one that is
    bit-equal is kept (none: always None). None where it does not apply: use the processor."""
    ip = image_processor
    if not _fast_applies(ip, image):
        return None
    fast = getattr(ip, "_mmhpc_pixels", None)
    if fast is None:
        with _FIRST_USE:
            fast = getattr(ip, "_mmhpc_pixels", None)
            if fast is None:
                fast = _check_formula(ip, image.width)
                ip._mmhpc_pixels = fast     # formula and table published together
    formula, lut = fast
    if formula is None:
        return None
    return _apply_lut(lut, _rgb_array(image))


def _torch_equal(a, b) -> bool:
    import torch
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def preprocess_image(image_processor, image, kind: str) -> dict:
    """The processor's outputs for one image (pixel_values, and image_grid_thw for Qwen2-VL),
    through `fast_pixel_values` where it applies. kind: the family's `processor` kind."""
    fast = fast_pixel_values(image_processor, image) if kind == "llava" else None
    if fast is not None:
        return {"pixel_values": fast}
    return image_processor(images=[image], return_tensors="pt")


class InputProcessor:
    """Chat template, tokenizer and image preprocessing of one checkpoint.

    `process` accepts, per image, a PIL image (preprocessed here: `pixel_values`, and
    `grid_thw` for Qwen2-VL, `image_size` for LLaVA-NeXT; kind "hf": `pixel_values` is the
    image processor's output dict, and HF's own processor expands the prompt) or a tensor of
    pre-computed embeddings `[n, hidden]` (then `num_tokens = n`; for Qwen2-VL the M-RoPE grid
    defaults to one row of n merged tokens, or pass `{"embeddings": tensor, "grid_thw": (t, h,
    w)}` with h, w in patches; a "file" entry, the media.Embeddings they were loaded from,
    becomes `MMItem.source`).
    """

    def __init__(self, model_path: str | Path, kind: str | None = None):
        """kind: registry.PROCESSOR_KINDS; default: the family's (an unregistered one: "hf")."""
        from transformers import AutoImageProcessor, AutoTokenizer

        self.path = Path(model_path)
        config = _read_json(self.path / "config.json")
        self.family: str = config.get("model_type", "")
        self.kind: str = kind or processor_kind(self.family)
        if self.kind == "hf":
            self.hf_processor = hf_processor(self.path)
            self.tokenizer = self.hf_processor.tokenizer
            self.image_processor = self.hf_processor.image_processor
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.image_processor = None if self.kind == "llama4" \
                else AutoImageProcessor.from_pretrained(self.path)   # llama4's needs torchvision
        proc_cfg = _read_json(self.path / "processor_config.json")
        self.tiles = None
        if self.kind == "hf":       # the prompt's placeholder; its expansion's token below
            self.image_token = self.hf_processor.image_token
            self.image_token_id = (getattr(self.tokenizer, "image_token_id", None)
                                   or config.get("image_token_id", config.get("image_token_index")))
        elif self.kind == "llama4":
            from mmhpc.multimodal import tiles
            self.tiles = tiles.TileConfig.from_files(
                _read_json(self.path / "preprocessor_config.json"), proc_cfg)
            self.image_token = "<|image|>"
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            self.span_tokens = {t: self.tokenizer.convert_tokens_to_ids(t) for t in tiles.SPECIAL}
        elif self.kind in ("llava", "llava_next"):
            self.image_token = proc_cfg.get("image_token", "<image>")
            self.image_token_id: int = config.get("image_token_index", config.get("image_token_id"))
            self.patch_size = proc_cfg.get("patch_size") or config["vision_config"]["patch_size"]
            self.feature_strategy = proc_cfg.get(
                "vision_feature_select_strategy", config.get("vision_feature_select_strategy"))
            self.num_additional_tokens = proc_cfg.get("num_additional_image_tokens", 0)
            self.grid_pinpoints = config.get("image_grid_pinpoints")     # LLaVA-NeXT's tiles
            self.tile_size = config["vision_config"].get("image_size")
        else:
            self.image_token = getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"
            self.image_token_id = config.get("image_token_id")
            self.patch_size = self.image_processor.patch_size
            self.merge_size = self.image_processor.merge_size
        if self.image_token_id is None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.eos_token_ids: list[int] = self._eos_ids(config)

    def _eos_ids(self, config: dict[str, Any]) -> list[int]:
        eos = _read_json(self.path / "generation_config.json").get("eos_token_id")
        if eos is None:
            eos = config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        return list(dict.fromkeys(ids))

    # ------------------------------------------------------------------ text
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """OpenAI-style messages → prompt text; image parts ({"type": "image"} or "image_url")
        become the family's placeholder."""
        norm = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [{**p, "type": "image"} if p.get("type") in ("image_url", "input_image")
                           else dict(p) for p in content]
            norm.append({**m, "content": "" if content is None else content})
        return self.tokenizer.apply_chat_template(norm, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---------------------------------------------------------------- images
    def num_image_tokens(self, width: int, height: int) -> int:
        if self.kind == "hf":
            from PIL import Image
            return self._hf_num_tokens(Image.new("RGB", (width, height)))
        if self.kind == "llava_next":
            from mmhpc.models.llava_next import num_image_tokens
            n = num_image_tokens(height, width, self.grid_pinpoints, self.tile_size,
                                 self.patch_size, self.num_additional_tokens)
            return n - 1 if self.feature_strategy == "default" else n
        if self.tiles is not None:
            from mmhpc.multimodal import tiles
            return tiles.span_length(*tiles.tile_grid(height, width, self.tiles),
                                     self.tiles.tokens_per_tile)
        if self.kind == "llava":
            crop = getattr(self.image_processor, "crop_size", None) or {}
            size = getattr(self.image_processor, "size", None) or {}
            h = _get(crop, "height") or _get(size, "height") or _get(size, "shortest_edge")
            w = _get(crop, "width") or _get(size, "width") or _get(size, "shortest_edge")
            n = (h // self.patch_size) * (w // self.patch_size) + self.num_additional_tokens
            return n - 1 if self.feature_strategy == "default" else n
        grid_h, grid_w = self._qwen_grid(width, height)
        return grid_h * grid_w // self.merge_size**2

    def _qwen_grid(self, width: int, height: int) -> tuple[int, int]:
        ip = self.image_processor
        size = getattr(ip, "size", None) or {}
        min_pixels = _get(size, "shortest_edge") or getattr(ip, "min_pixels", None)
        max_pixels = _get(size, "longest_edge") or getattr(ip, "max_pixels", None)
        h, w = _smart_resize()(height, width, factor=self.patch_size * self.merge_size,
                               min_pixels=min_pixels, max_pixels=max_pixels)
        return h // self.patch_size, w // self.patch_size

    @property
    def _no_embeddings(self) -> str:
        return (f"{self.family}: pre-computed image embeddings are not supported "
                "(HF's processor takes images)")

    def _hf_num_tokens(self, image) -> int:
        """Image tokens of one image: HF's processor expands a prompt of its placeholder."""
        ids = self.hf_processor(text=[self.image_token], images=[image])["input_ids"][0]
        return sum(1 for t in ids if t == self.image_token_id)

    def _hf_pixels(self, image) -> dict:
        return dict(self.image_processor(images=[image], return_tensors="pt"))

    def _image_item(self, image) -> MMItem:
        if self.kind == "hf":
            return MMItem(image_hash(image), -1, self._hf_num_tokens(image),
                          pixel_values=self._hf_pixels(image))
        if self.tiles is not None:
            from mmhpc.multimodal import tiles
            pixel_values, (rows, cols) = tiles.preprocess(image, self.tiles)
            return MMItem(content_hash=image_hash(image), offset=-1,
                          num_tokens=tiles.span_length(rows, cols, self.tiles.tokens_per_tile),
                          grid_thw=(1, rows, cols), pixel_values=pixel_values)
        out = preprocess_image(self.image_processor, image, self.kind)
        pixel_values = out["pixel_values"]
        if self.kind == "llava_next":
            # pixel_values: [1, num_tiles, 3, S, S] (the base view first)
            return MMItem(content_hash=image_hash(image), offset=-1,
                          num_tokens=self.num_image_tokens(image.width, image.height),
                          pixel_values=pixel_values[0], image_size=(image.height, image.width))
        if self.kind == "llava":
            # pixel_values: [1, 3, H, W]
            h, w = pixel_values.shape[-2:]
            n = (h // self.patch_size) * (w // self.patch_size) + self.num_additional_tokens
            n -= 1 if self.feature_strategy == "default" else 0
            return MMItem(content_hash=image_hash(image), offset=-1, num_tokens=int(n),
                          pixel_values=pixel_values)
        # pixel_values: [num_patches, C * T * P * P]; grid in patches
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        n = grid[0] * grid[1] * grid[2] // self.merge_size**2
        return MMItem(content_hash=image_hash(image), offset=-1, num_tokens=n, grid_thw=grid,
                      pixel_values=pixel_values)

    def _embedding_item(self, item: Any) -> MMItem:
        grid = source = None
        if isinstance(item, dict):
            grid = tuple(int(x) for x in item["grid_thw"]) if item.get("grid_thw") else None
            source = item.get("file")
            item = item["embeddings"]
        if self.kind == "hf":
            raise ValueError(self._no_embeddings)
        if item.dim() != 2:
            raise ValueError(f"image embeddings must be [num_tokens, hidden], got {tuple(item.shape)}")
        n = int(item.shape[0])
        if self.tiles is not None:
            from mmhpc.multimodal import tiles
            grid = grid or (1, 1, 1)
            if tiles.span_length(grid[1], grid[2], self.tiles.tokens_per_tile) != n:
                raise ValueError(f"grid_thw {grid} (1, tile rows, tile cols) does not span {n} tokens")
        if self.kind == "qwen2_vl":
            m = self.merge_size
            grid = grid or (1, m, n * m)
            if grid[0] * grid[1] * grid[2] // m**2 != n:
                raise ValueError(f"grid_thw {grid} does not hold {n} merged tokens")
        return MMItem(content_hash=tensor_hash(item), offset=-1, num_tokens=n, grid_thw=grid,
                      embeddings=item, source=source)

    # --------------------------------------------------------------- prompts
    def image_item(self, image) -> MMItem:
        """One PIL image → MMItem with pixel values (and grid); offset is set by `process`."""
        return self._image_item(image)

    def embedding_item(self, embeddings) -> MMItem:
        """Pre-computed embeddings (a [n, hidden] tensor, or {"embeddings", "grid_thw"}) →
        MMItem (content hash over the tensor, grid checked / defaulted for Qwen2-VL)."""
        return self._embedding_item(embeddings)

    def _counted_item(self, image) -> MMItem:
        """Placeholder count and grid only (no pixel values): the encode stage preprocesses."""
        if self.kind == "hf":
            return MMItem(image_hash(image), -1, self._hf_num_tokens(image))
        grid = None
        if self.kind == "qwen2_vl":
            gh, gw = self._qwen_grid(image.width, image.height)
            grid = (1, gh, gw)
        elif self.tiles is not None:
            from mmhpc.multimodal import tiles
            grid = (1, *tiles.tile_grid(image.height, image.width, self.tiles))
        return MMItem(content_hash=image_hash(image), offset=-1,
                      num_tokens=self.num_image_tokens(image.width, image.height), grid_thw=grid)

    def process(self, prompt: str, images: list[Any] = (), with_pixels: bool = True
                ) -> tuple[list[int], list[MMItem]]:
        """Tokenize `prompt` and expand its image placeholders, one per image, in order.
        `with_pixels=False`: images get counts and grids only (a disaggregated frontend)."""
        if self.kind == "hf":
            return self._hf_process(prompt, list(images or []), with_pixels)
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        images = list(images or [])
        if len(positions) != len(images):
            raise ValueError(f"the prompt has {len(positions)} image placeholder(s) "
                             f"({self.image_token}) but {len(images)} image(s) were given")
        image_item = self._image_item if with_pixels else self._counted_item
        items = [image_item(im) if _is_image(im) else self._embedding_item(im) for im in images]
        out: list[int] = []
        start = 0
        for pos, item in zip(positions, items):
            out += ids[start:pos]
            item.offset = len(out)
            out += self.placeholder_ids(item)
            start = pos + 1
        out += ids[start:]
        return out, items

    def placeholder_ids(self, item: MMItem) -> list[int]:
        """The prompt tokens an item occupies (Llama-4: its tiled span)."""
        if self.tiles is None:
            return [self.image_token_id] * item.num_tokens
        from mmhpc.multimodal import tiles
        return tiles.span_ids(item.grid_thw[1], item.grid_thw[2], self.tiles.tokens_per_tile,
                              self.span_tokens)

    def _hf_process(self, prompt: str, images: list[Any], with_pixels: bool
                    ) -> tuple[list[int], list[MMItem]]:
        """HF's processor expands the prompt (as its own `generate` inputs); each image's
        tokens are one run of `image_token_id`, in order."""
        if not all(_is_image(im) for im in images):
            raise ValueError(self._no_embeddings)
        ids = self.hf_processor(text=[prompt], images=images or None)["input_ids"][0]
        ids = [int(t) for t in ids]
        runs: list[list[int]] = []                       # [offset, num_tokens]
        for i, t in enumerate(ids):
            if t == self.image_token_id:
                if runs and runs[-1][0] + runs[-1][1] == i:
                    runs[-1][1] += 1
                else:
                    runs.append([i, 1])
        if len(runs) != len(images):
            raise ValueError(f"the prompt has {len(runs)} image(s) after expansion but "
                             f"{len(images)} image(s) were given (adjacent images cannot be "
                             "told apart)")
        items = [MMItem(image_hash(im), off, n,
                        pixel_values=self._hf_pixels(im) if with_pixels else None)
                 for (off, n), im in zip(runs, images)]
        return ids, items

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def hf_processor(path: str | Path):
    """HF's own processor for a checkpoint (the oracle's input side).

    `AutoProcessor` needs torchvision for the Qwen families (their video processors); where
    torchvision is missing, an image-only processor (video_processor=None) stands in.
    """
    import transformers
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError:
        model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
        if processor_kind(model_type) != "qwen2_vl":
            raise
    from transformers import AutoImageProcessor, AutoTokenizer
    base = {"qwen2_vl": transformers.Qwen2VLProcessor,
            "qwen2_5_vl": transformers.Qwen2_5_VLProcessor}.get(model_type,
                                                                transformers.Qwen3VLProcessor)

    class ImageOnlyQwen2VLProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImageOnlyQwen2VLProcessor(image_processor=AutoImageProcessor.from_pretrained(path),
                                     tokenizer=tokenizer, video_processor=None,
                                     chat_template=tokenizer.chat_template)


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def _is_image(x: Any) -> bool:
    from PIL import Image
    return isinstance(x, Image.Image)
