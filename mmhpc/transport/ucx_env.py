"""UCX settings that mmhpc applies before a NIXL agent makes its UCX context (UCX reads its
environment once, then), only for agents that will move GPU memory and only where the user set
nothing: an exported UCX_* variable always wins; MMHPC_UCX_DEFAULTS=0 turns all of this off.

- UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y: UCX disables cuda_ipc GET (what a NIXL READ is) on a GPU
  without active NVLinks (a PCIe card, or one GPU of a VM), so a READ between two processes on
  the same GPU or PCIe peers falls back to a staged path at < 1 GB/s (issue 10: 0.4 GB/s on one
  H100). With GET enabled it is a cuda_ipc device-to-device copy (bench/nixl_gpu.py,
  bench/RESULTS.md "Same-GPU NIXL"). NIXL's own UCX plugin enables it from a later release on.
"""
from __future__ import annotations

import os

VRAM_DEFAULTS: dict[str, str] = {
    "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y",
}


def apply_ucx_defaults(vram: bool) -> dict[str, str]:
    """Set the VRAM defaults missing from os.environ; returns what was set."""
    if not vram or os.environ.get("MMHPC_UCX_DEFAULTS", "1") == "0":
        return {}
    applied = {}
    for key, value in VRAM_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def wants_vram() -> bool:
    """Whether this process will register GPU memory: a CUDA device is visible to torch."""
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 (no torch: DRAM only)
        return False
