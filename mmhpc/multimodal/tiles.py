"""Llama-4 image tiling without torchvision: an image becomes up to `max_patches` tiles of
`size` x `size` pixels on the canvas that fits it best (HF `Llama4ImageProcessor`'s choice),
plus a global view (the whole image resized to one tile) when there is more than one tile,
and its prompt span: <|image_start|>, each tile's patch tokens (x / y separators between tiles
and after each row), <|image|>, the global view's patch tokens, <|image_end|>.

Resizing is PIL's bilinear (HF resizes with torchvision's antialiased bilinear: pixel values
may differ in the last bits; both sides of the oracle take these pixels). Rescale and
normalize run in bfloat16 as HF's processor does.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

SPECIAL = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
           "<|tile_x_separator|>", "<|tile_y_separator|>")


@dataclass(frozen=True)
class TileConfig:
    size: int                       # a tile's side in pixels
    max_tiles: int
    tokens_per_tile: int            # (size / patch)^2 * pixel_shuffle_ratio^2
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale: float = 1 / 255

    @staticmethod
    def from_files(preprocessor: dict, processor: dict) -> "TileConfig":
        size = preprocessor.get("size", {}).get("height", 336)
        patch = processor.get("patch_size", 14)
        ratio = processor.get("pixel_shuffle_ratio", 0.5)
        return TileConfig(size, preprocessor.get("max_patches", 16),
                          int((size // patch) ** 2 * ratio ** 2),
                          tuple(preprocessor.get("image_mean", (0.5,) * 3)),
                          tuple(preprocessor.get("image_std", (0.5,) * 3)),
                          preprocessor.get("rescale_factor", 1 / 255))


@lru_cache(maxsize=8)
def supported_resolutions(max_tiles: int, size: int) -> tuple[tuple[int, int], ...]:
    """Canvases of up to `max_tiles` tiles, in HF's order (grouped by aspect ratio)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for f in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(f / (n // f), []).append((f, n // f))
    return tuple((h * size, w * size) for v in by_ratio.values() for h, w in v)


def best_canvas(height: int, width: int, cfg: TileConfig) -> tuple[int, int]:
    """The canvas (pixels) HF picks: the smallest upscale >= 1, else the least downscale;
    ties to the smallest area."""
    res = supported_resolutions(cfg.max_tiles, cfg.size)
    scales = [min(h / height, w / width) for h, w in res]
    up = [s for s in scales if s >= 1]
    pick = min(up) if up else max(scales)
    chosen = [r for r, s in zip(res, scales) if s == pick]
    return min(chosen, key=lambda r: r[0] * r[1])


def tile_grid(height: int, width: int, cfg: TileConfig) -> tuple[int, int]:
    h, w = best_canvas(height, width, cfg)
    return h // cfg.size, w // cfg.size


def _resized_size(height: int, width: int, canvas: tuple[int, int], size: int) -> tuple[int, int]:
    """Largest size fitting the canvas without distortion (and no upscale past one tile)."""
    th = min(max(height, size), canvas[0])
    tw = min(max(width, size), canvas[1])
    sw, sh = tw / width, th / height
    if sw < sh:
        return max(1, min(int(height * sw), th)), max(1, tw)
    return max(1, th), max(1, min(int(width * sh), tw))


def _normalize(x, cfg: TileConfig):
    """uint8 [H, W, 3] -> [3, H, W] float32 through bfloat16 (HF's processor)."""
    import torch
    t = torch.from_numpy(x).permute(2, 0, 1).to(torch.bfloat16) * cfg.rescale
    mean = torch.tensor(cfg.mean, dtype=torch.bfloat16)[:, None, None]
    std = torch.tensor(cfg.std, dtype=torch.bfloat16)[:, None, None]
    return ((t - mean) / std).float()


def preprocess(image, cfg: TileConfig):
    """PIL image -> (pixel_values [tiles (+1 global), 3, size, size] float32, (rows, cols))."""
    import numpy as np
    import torch
    from PIL import Image
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    canvas = best_canvas(rgb.height, rgb.width, cfg)
    h, w = _resized_size(rgb.height, rgb.width, canvas, cfg.size)
    padded = np.zeros((canvas[0], canvas[1], 3), dtype=np.uint8)
    padded[:h, :w] = np.asarray(rgb.resize((w, h), Image.BILINEAR))
    rows, cols = canvas[0] // cfg.size, canvas[1] // cfg.size
    x = _normalize(padded, cfg)                                              # [3, H, W]
    tiles = x.view(3, rows, cfg.size, cols, cfg.size).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(rows * cols, 3, cfg.size, cfg.size)
    if rows * cols > 1:
        glob = _normalize(np.array(rgb.resize((cfg.size, cfg.size), Image.BILINEAR)), cfg)
        tiles = torch.cat([tiles, glob[None]])
    return tiles.contiguous(), (rows, cols)


def span_ids(rows: int, cols: int, tokens_per_tile: int, ids: dict[str, int]) -> list[int]:
    """An image's prompt span (token ids); `ids` maps the SPECIAL tokens to their ids."""
    patch, out = [ids["<|patch|>"]] * tokens_per_tile, [ids["<|image_start|>"]]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += patch
                if x < cols - 1:
                    out.append(ids["<|tile_x_separator|>"])
            out.append(ids["<|tile_y_separator|>"])
    return out + [ids["<|image|>"]] + patch + [ids["<|image_end|>"]]


def span_length(rows: int, cols: int, tokens_per_tile: int) -> int:
    tiles = rows * cols
    grid = tiles * tokens_per_tile + (cols - 1) * rows + rows if tiles > 1 else 0
    return 3 + grid + tokens_per_tile
