"""The paged KV pool of one rank: `[num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]`
(head-major inside a block, so a TP slice of heads is contiguous for NIXL), sized from a
memory budget or `cache.num_blocks`."""
from __future__ import annotations

import torch

from mmhpc.config import CacheConfig
from mmhpc.models.layers import kv_cache_shape


def bytes_per_block(text_config, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    shape = kv_cache_shape(text_config, 1, block_size, tp_size)
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def num_blocks_for(cache: CacheConfig, text_config, dtype: torch.dtype, device: torch.device,
                   tp_size: int = 1) -> int:
    """`cache.num_blocks`, else the budget: `cpu_kv_cache_gb` on CPU, or
    `gpu_memory_utilization` x the device's free memory (call after the weights are loaded)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * cache.gpu_memory_utilization
    else:
        budget = cache.cpu_kv_cache_gb * (1 << 30)
    num = int(budget // bytes_per_block(text_config, cache.block_size, dtype, tp_size))
    if num < 2:
        raise ValueError(f"KV budget of {budget / (1 << 20):.1f} MiB holds {num} blocks; raise "
                         "cache.cpu_kv_cache_gb / gpu_memory_utilization or set cache.num_blocks")
    return num


def allocate_kv_cache(text_config, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device, tp_size: int = 1) -> torch.Tensor:
    return torch.zeros(kv_cache_shape(text_config, num_blocks, block_size, tp_size),
                       dtype=dtype, device=device)
