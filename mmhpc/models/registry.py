"""The model-family registry: one `Family` entry per config.json `model_type`.

Everything family-specific is reached from here: our torch module (`model`), the way the
input processor counts image placeholders (`processor`), and the tiny-checkpoint builder
(`tiny`). References are "module:attribute" strings, imported on first use, so reading the
registry imports neither torch nor transformers. See README.md to add a family.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

# InputProcessor's ways of turning one image into placeholders (multimodal/processor.py):
#   "llava":    a fixed-size image (CLIP crop), num_tokens from the patch grid;
#   "qwen2_vl": a dynamic grid (smart_resize), num_tokens = t*h*w / merge**2, grid_thw kept;
#   "llama4":   tiles + a global view (multimodal/tiles.py, no torchvision); an image's tokens
#               are its whole span <|image_start|> .. <|image_end|>, grid_thw = (1, rows, cols);
#   "hf":       Hugging Face's own processor (AutoProcessor) expands the prompt; each image's
#               tokens are one run of the image token. Any VLM; pixels only (no embeddings).
#   "llava_next": anyres tiles (a base view + a grid pinpoint's tiles): num_tokens from the
#               image's size and aspect (models/llava_next.py), `image_size` kept.
PROCESSOR_KINDS = ("llava", "qwen2_vl", "llama4", "hf", "llava_next")


@dataclass(frozen=True)
class Family:
    """One model family, keyed by its config.json `model_type`."""

    model_type: str
    model: str | None       # "module:Class" of our nn.Module (the module defines WEIGHT_RULES);
                            # None: only `engine.backend=transformers` serves it
    processor: str          # one of PROCESSOR_KINDS
    tiny: str | None = None  # "module:NAME" of a tools.tiny.TinyFamily (None: no tiny build)

    def __post_init__(self) -> None:
        if self.processor not in PROCESSOR_KINDS:
            raise ValueError(f"{self.model_type}: processor {self.processor!r} is not one of "
                             f"{PROCESSOR_KINDS}")

    def model_class(self) -> type:
        if self.model is None:
            raise ValueError(f"model_type {self.model_type!r} has no native model: "
                             "serve it with engine.backend=transformers")
        return _resolve(self.model)

    def weight_rules(self) -> list[tuple[str, str]]:
        return importlib.import_module(self.model.split(":")[0]).WEIGHT_RULES

    def tiny_builder(self) -> Any:
        if self.tiny is None:
            raise ValueError(f"model_type {self.model_type!r} has no tiny builder")
        return _resolve(self.tiny)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.model_type in FAMILIES:
        raise ValueError(f"model_type {family.model_type!r} is registered twice")
    FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def processor_kind(model_type: str) -> str:
    """How InputProcessor handles `model_type`: its family's kind; "hf" for a model_type not
    registered (engine.backend=transformers serves any VLM transformers loads)."""
    family = FAMILIES.get(model_type)
    return family.processor if family is not None else "hf"


def tiny_families() -> list[str]:
    """model_types that `mmhpc.tools.tiny` can build."""
    return [name for name, f in FAMILIES.items() if f.tiny is not None]


def _resolve(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


# ------------------------------------------------------------------------- the families
register(Family("llava", model="mmhpc.models.llava:LlavaForCausalLM", processor="llava",
                tiny="mmhpc.tools.tiny:LLAVA"))
register(Family("qwen2_vl", model="mmhpc.models.qwen2_vl:Qwen2VLForCausalLM",
                processor="qwen2_vl", tiny="mmhpc.tools.tiny:QWEN2_VL"))
register(Family("llama4", model="mmhpc.models.llama4:Llama4ForCausalLM", processor="llama4",
                tiny="mmhpc.tools.tiny:LLAMA4"))
register(Family("gemma3", model=None, processor="hf", tiny="mmhpc.tools.tiny:GEMMA3"))
register(Family("llava_next", model="mmhpc.models.llava_next:LlavaNextForCausalLM",
                processor="llava_next", tiny="mmhpc.tools.tiny_dense_vlm:LLAVA_NEXT"))
register(Family("qwen2_5_vl", model="mmhpc.models.qwen2_5_vl:Qwen2_5_VLForCausalLM",
                processor="qwen2_vl", tiny="mmhpc.tools.tiny_dense_vlm:QWEN2_5_VL"))
register(Family("qwen3_vl", model="mmhpc.models.qwen3_vl:Qwen3VLForCausalLM",
                processor="qwen2_vl", tiny="mmhpc.tools.tiny:QWEN3_VL"))
register(Family("qwen3_vl_moe", model="mmhpc.models.qwen3_vl:Qwen3VLMoeForCausalLM",
                processor="qwen2_vl", tiny="mmhpc.tools.tiny:QWEN3_VL_MOE"))
