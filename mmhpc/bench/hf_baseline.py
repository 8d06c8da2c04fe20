"""HF transformers `generate` (greedy, static batches) on the bench's inputs: the baseline.

Same prompts (image placeholders expanded, as HF's processor does) and the same pixel values;
random weights when the checkpoint has none (timing only). Every request of a batch has the
same length, so no padding is needed."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from mmhpc.bench.inputs import ImageItems, build_prompt


def build_hf_model(model_path: str, hf_config, dtype: torch.dtype, device):
    from transformers import AutoModelForImageTextToText
    from mmhpc.models.arch import is_arch
    if is_arch(model_path) or not any(Path(model_path).glob("*.safetensors")):
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
    else:
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device)
    return model.eval()


def takes_token_types(model) -> bool:
    """Whether this transformers version's model wants `mm_token_type_ids` (5.2x Qwen)."""
    import inspect
    return "mm_token_type_ids" in inspect.signature(model.forward).parameters


def hf_inputs(batch, items_of, image_token_id: int, kind: str, device, dtype,
              token_types: bool = False):
    ids, pixels, grids = [], [], []
    for r in batch:
        its = items_of(r)
        ids.append(build_prompt(its, r.text_ids, image_token_id))
        pixels += [it.pixel_values for it in its]
        grids += [list(it.grid_thw) for it in its if it.grid_thw is not None]
    kw = dict(input_ids=torch.tensor(ids, device=device),
              attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long, device=device))
    if pixels:
        kw["pixel_values"] = torch.cat(pixels).to(device=device, dtype=dtype)
        if kind == "qwen2_vl":
            kw["image_grid_thw"] = torch.tensor(grids, device=device)
            if token_types:
                kw["mm_token_type_ids"] = (kw["input_ids"] == image_token_id).int()
    return kw


def run_hf(model_path: str, model_dir: Path, hf_config, requests, batch_sizes: list[int],
           max_requests: int | None, dtype_name: str = "auto") -> dict:
    from mmhpc.models import resolve_dtype
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = resolve_dtype(dtype_name, device)
    t0 = time.perf_counter()
    model = build_hf_model(model_path, hf_config, dtype, device)
    load_s = time.perf_counter() - t0
    images = ImageItems(model_dir, hf_config)
    types = takes_token_types(model)
    cache: dict = {}

    def items_of(r):
        if r.request_id not in cache:
            cache[r.request_id] = [images(im) for im in r.images]
        return cache[r.request_id]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out_len = requests[0].output_len
    gen = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False)
    with torch.inference_mode():                   # warm-up: kernels, allocator
        model.generate(**hf_inputs(requests[:1], items_of, images.image_token_id,
                                   images.kind, device, dtype, types),
                       **{**gen, "max_new_tokens": 2,
                                                                     "min_new_tokens": 2})
    rows = []
    for bs in batch_sizes:
        todo = requests[:max_requests] if max_requests else requests
        todo = todo[:max(bs, len(todo) // bs * bs)]       # whole batches only
        num_out = 0
        sync()
        t = time.perf_counter()
        try:
            with torch.inference_mode():
                for i in range(0, len(todo), bs):          # preprocessing is inside the timing
                    kw = hf_inputs(todo[i:i + bs], items_of, images.image_token_id,
                                   images.kind, device, dtype, types)
                    res = model.generate(**kw, **gen)
                    num_out += (res.shape[1] - kw["input_ids"].shape[1]) * res.shape[0]
            sync()
        except torch.OutOfMemoryError:
            rows.append(dict(batch_size=bs, error="out of memory", output_tokens_per_s=0.0))
            gc.collect()
            torch.cuda.empty_cache()
            continue
        dt = time.perf_counter() - t
        rows.append(dict(batch_size=bs, num_requests=len(todo), num_output_tokens=num_out,
                         seconds=round(dt, 3), output_tokens_per_s=round(num_out / dt, 1)))
        cache.clear()                                  # next batch size preprocesses again
        print(f"hf bs={bs}: {rows[-1]}", flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(load_s=round(load_s, 2), batches=rows)
