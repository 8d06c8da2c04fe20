"""Model families, registered by config.json `model_type` in registry.py. See README.md to
add one."""
from __future__ import annotations

from pathlib import Path

import torch

from mmhpc.models.registry import FAMILIES, Family, get_family, register  # noqa: F401


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_hf_config(path: str | Path):
    from transformers import AutoConfig

    from mmhpc.models.arch import arch_dir, is_arch
    if is_arch(path):                      # real-size architecture, config values only
        path = arch_dir(path)
    return AutoConfig.from_pretrained(str(path))


def _init_random(model) -> None:
    """Small random weights (std 0.02, norms at 1) so that a random model's activations stay
    finite in bf16 at full depth; default inits of large Linear layers overflow. A norm is a
    module whose class name says so (CLIP's `pre_layrnorm`, Qwen's merger `ln_q`)."""
    norms = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
             if "norm" in type(mod).__name__.lower()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif name in norms or ("norm" in name and name.endswith("weight")):
                p.fill_(1.0)
            else:
                p.zero_()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               random_weights: bool = False, seed: int = 0, tp_rank: int = 0, tp_size: int = 1):
    """Build the family's module on `device` and fill it from the checkpoint (or randomly)."""
    hf_config = load_hf_config(path)
    family = get_family(hf_config.model_type)
    model_class = family.model_class()
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(hf_config)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype)
    tie = getattr(hf_config, "tie_word_embeddings", False) or \
        getattr(hf_config.text_config, "tie_word_embeddings", False)
    if random_weights:
        _init_random(model)
        if tie:
            model.lm_head.weight = model.language_model.embed_tokens.weight
    else:
        from mmhpc.models.loader import load_weights
        load_weights(model, path, family.weight_rules(), tp_rank, tp_size, tie_word_embeddings=tie)
    return model.eval()
