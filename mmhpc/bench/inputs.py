"""The bench's model inputs: synthetic images → MMItems, and prompts with their placeholders
expanded; shared by the engine run (offline.py) and the HF baseline (hf_baseline.py)."""
from __future__ import annotations

from pathlib import Path


class ImageItems:
    """PIL image → MMItem (pixel values, placeholder count, grid) for one model."""

    def __init__(self, model_dir: Path, hf_config):
        from transformers import AutoImageProcessor
        self.proc = AutoImageProcessor.from_pretrained(str(model_dir))
        self.cfg = hf_config
        from mmhpc.models.registry import get_family
        self.kind = get_family(hf_config.model_type).processor
        self.image_token_id = (getattr(hf_config, "image_token_index", None)
                               or hf_config.image_token_id)

    def __call__(self, image):
        from mmhpc.engine.sequence import MMItem
        from mmhpc.multimodal.processor import image_hash, preprocess_image
        out = preprocess_image(self.proc, image, self.kind)
        pv = out["pixel_values"]
        h = image_hash(image)                   # as the server's processor: the decoded RGB
        if self.kind == "llava":
            from mmhpc.models.llava import image_tokens
            return MMItem(h, 0, image_tokens(self.cfg, pv.shape[-2], pv.shape[-1]), None, pv)
        if self.kind == "llava_next":           # pv: [1, tiles, 3, S, S]
            from mmhpc.models.llava_next import num_image_tokens
            vc = self.cfg.vision_config
            n = num_image_tokens(image.height, image.width, self.cfg.image_grid_pinpoints,
                                 vc.image_size, vc.patch_size)
            return MMItem(h, 0, n, None, pv[0], image_size=(image.height, image.width))
        from mmhpc.models.qwen2_vl import image_tokens
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        return MMItem(h, 0, image_tokens(self.cfg, grid), grid, pv)


def build_prompt(items, text_ids: list[int], image_token_id: int) -> list[int]:
    """[1] + each image's placeholders + text; sets each item's offset."""
    ids = [1]
    for it in items:
        it.offset = len(ids)
        ids += [image_token_id] * it.num_tokens
    return ids + list(text_ids)
