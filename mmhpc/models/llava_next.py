"""LLaVA-NeXT (LLaVA-1.6): LLaVA's CLIP tower, projector and Llama/Mistral decoder, with anyres
tiling. An image is resized onto the best of `image_grid_pinpoints` and cut into tower-sized
tiles; the tower sees a base view (the whole image) plus the tiles. The tiles' features are
laid back into one grid, the padding the resize added is cut off ("unpadding"), and each row
of the grid ends with `image_newline`. So one image's token count depends on its size and
aspect: `num_image_tokens` (the frontend's count) and `pack` (the engine's rows) share
`anyres_shape`, and both equal HF's processor and model.
"""
from __future__ import annotations

import torch
from torch import nn

from mmhpc.models.llava import WEIGHT_RULES as _LLAVA_RULES, LlavaForCausalLM

WEIGHT_RULES = [("model.image_newline", "image_newline"), *_LLAVA_RULES]


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (h, w) keeping the most of the image's pixels, then wasting the fewest
    (HF's `select_best_resolution`)."""
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def anyres_shape(height: int, width: int, pinpoints, tile: int, patch: int
                 ) -> tuple[int, int, int, int, int]:
    """(tiles down, tiles across, patches per tile side, kept rows, kept columns) of an image
    of height x width px: the tiles' patch grid is (tiles down x side) x (tiles across x side)
    and unpadding keeps the centred rows x columns of it that the image (not the padding) fills."""
    ph, pw = best_resolution(height, width, pinpoints)
    nh, nw, side = ph // tile, pw // tile, tile // patch
    rows, cols = nh * side, nw * side
    if width / height > cols / rows:                       # image wider: pad rows were added
        pad = (rows - int(round(height * (cols / width), 7))) // 2
        return nh, nw, side, rows - 2 * pad, cols
    pad = (cols - int(round(width * (rows / height), 7))) // 2
    return nh, nw, side, rows, cols - 2 * pad


def num_image_tokens(height: int, width: int, pinpoints, tile: int, patch: int,
                     extra: int = 0) -> int:
    """Placeholder tokens of one image: the base view's patches (+ `extra`, e.g. a kept CLS)
    and the unpadded grid with one newline per row."""
    _, _, side, rows, cols = anyres_shape(height, width, pinpoints, tile, patch)
    return side * side + extra + rows * (cols + 1)


def num_tiles(height: int, width: int, pinpoints, tile: int) -> int:
    """Tower inputs of one image: the base view and the tiles."""
    ph, pw = best_resolution(height, width, pinpoints)
    return 1 + (ph // tile) * (pw // tile)


class LlavaNextForCausalLM(LlavaForCausalLM):
    def __init__(self, config):
        if getattr(config.text_config, "sliding_window", None) is not None:
            raise ValueError("LLaVA-NeXT: sliding-window attention in the language model is not "
                             f"supported (text_config.sliding_window={config.text_config.sliding_window})")
        if config.vision_feature_select_strategy != "default":
            raise ValueError("LLaVA-NeXT: only vision_feature_select_strategy='default' is supported")
        super().__init__(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))

    def anyres_shape(self, height: int, width: int) -> tuple[int, int, int, int, int]:
        vc = self.config.vision_config
        return anyres_shape(height, width, self.config.image_grid_pinpoints, vc.image_size,
                            vc.patch_size)

    def pack(self, feats: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One image's projected tile features [1 + nh*nw, side*side, hidden] → its rows
        [num_tokens, hidden]: the base view, then the unpadded tile grid row by row, each row
        followed by `image_newline`."""
        nh, nw, side, rows, cols = self.anyres_shape(height, width)
        D = feats.shape[-1]
        grid = feats[1:].view(nh, nw, side, side, D).permute(0, 2, 1, 3, 4)   # [nh, s, nw, s, D]
        grid = grid.reshape(nh * side, nw * side, D)
        r0, c0 = (nh * side - rows) // 2, (nw * side - cols) // 2
        grid = grid[r0:r0 + rows, c0:c0 + cols]                               # [rows, cols, D]
        newline = self.image_newline.to(grid.dtype).expand(rows, 1, D)
        grid = torch.cat([grid, newline], dim=1).reshape(rows * (cols + 1), D)
        return torch.cat([feats[0], grid])

    @torch.inference_mode()
    def encode(self, mm_items) -> list[torch.Tensor]:
        """Every item's tiles ([n, 3, S, S]) in one tower batch, then packed per item."""
        feats = self.tile_features(mm_items)                   # [sum n, side*side, hidden]
        sizes = [it.pixel_values.shape[0] if it.pixel_values.dim() == 4 else 1 for it in mm_items]
        return [self.pack(f, *it.image_size) for f, it in zip(feats.split(sizes), mm_items)]

    def warm_up_items(self, max_tokens: int, max_items: int = 64) -> list:
        """Blank tower-sized images (a base view and their tiles) filling `max_tokens`."""
        from mmhpc.engine.sequence import MMItem
        vc = self.config.vision_config
        side = vc.image_size
        pins = self.config.image_grid_pinpoints
        tokens = num_image_tokens(side, side, pins, side, vc.patch_size)
        tiles = num_tiles(side, side, pins, side)
        n = max(1, min(max_items, max_tokens // tokens))
        return [MMItem("warm-up", 0, tokens, None, torch.zeros(tiles, 3, side, side),
                       image_size=(side, side)) for _ in range(n)]
