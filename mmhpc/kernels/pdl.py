"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A batch-1 decode step is ~10 kernels a layer (RMSNorm, four GEMVs, rotary + KV write, attention
and its reduce, SiLU-mul); at 4 TB/s the small ones take 1.5-7 us each, so the drain and launch
between kernels is a real share of the step. Launched with PDL, a kernel's programs may start
while the previous kernel finishes: each program does the work that reads nothing the previous
kernel writes (the GEMV's first weight chunk), then waits (`griddepcontrol.wait`: every earlier
kernel done and its writes visible), then lets the next kernel launch
(`griddepcontrol.launch_dependents`) and goes on. Every kernel here waits before it reads an
earlier kernel's output or writes anything, and signals only after its wait, so the order of the
stream holds transitively (a kernel can only start once the one before it has waited for its own
predecessor). Works inside CUDA graphs (programmatic edges).

`MMHPC_PDL=0` turns it off; it is off before compute capability 9.0 or on a Triton without
`griddepcontrol` (then the kernels are launched and run exactly as before).
"""
from __future__ import annotations

import os

import torch
import triton.language as tl

_ON: bool | None = None


def enabled() -> bool:
    """Launch the decode kernels with PDL (decided once per process; `set_enabled` overrides)."""
    global _ON
    if _ON is None:
        _ON = os.environ.get("MMHPC_PDL", "1") != "0" and _supported()
    return _ON


def set_enabled(on: bool | None) -> None:
    """Force PDL on/off for the following launches (None: decide again from MMHPC_PDL). Graphs
    captured before keep what they were captured with."""
    global _ON
    _ON = None if on is None else bool(on) and _supported()


def _supported() -> bool:
    cuda = getattr(tl.extra, "cuda", None)
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
            and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents"))


def launch_kwargs() -> dict:
    """Extra launch arguments of a PDL-aware kernel: its `USE_PDL` constexpr and, when on,
    Triton's `launch_pdl` flag."""
    on = enabled()
    return {"USE_PDL": on, "launch_pdl": True} if on else {"USE_PDL": False}
