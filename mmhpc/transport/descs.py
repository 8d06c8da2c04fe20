"""NIXL memory descriptors as plain ints, so they ride control messages (msgpack).

No nixl import here: the frontend and the codec read these without the NIXL runtime.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mmhpc.transport.codec import register


@dataclass
class NixlDescs:
    """Regions of one agent's registered memory: `regions[i] = [addr, nbytes, device_id]`."""
    agent: str                         # the NIXL agent name that owns the memory
    mem_type: str = "DRAM"             # "DRAM" | "VRAM"
    regions: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"mem_type must be DRAM or VRAM, got {self.mem_type!r}")
        self.regions = [[int(a), int(n), int(d)] for a, n, d in self.regions]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n, _ in self.regions)

    def tuples(self) -> list[tuple[int, int, int]]:
        return [(a, n, d) for a, n, d in self.regions]

    @classmethod
    def of_tensor(cls, agent: str, tensor) -> "NixlDescs":
        """One region covering a contiguous torch tensor (or a view into a registered pool)."""
        if not tensor.is_contiguous():
            raise ValueError("NIXL descriptors need a contiguous tensor")
        dev = tensor.get_device()
        return cls(agent, "DRAM" if dev < 0 else "VRAM",
                   [[tensor.data_ptr(), tensor.numel() * tensor.element_size(), max(dev, 0)]])


register(NixlDescs)
