"""Typed configuration. Hydra composes YAML over these dataclasses (registered in ConfigStore);
`Config.from_dictconfig` turns the result into plain dataclasses, so nothing below the launcher
ever sees a DictConfig. Validation lives in `__post_init__`; derived values are properties.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_MODEL = "models/mmhpc-toy"


@dataclass
class ModelConfig:
    path: str = DEFAULT_MODEL          # a Hugging Face checkpoint directory
    name: Optional[str] = None         # served model name; defaults to the directory's name
    dtype: str = "auto"                # auto: float32 on CPU, bfloat16 on CUDA
    random_weights: bool = False       # build weights on the device instead of reading them
    max_model_len: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.max_model_len < 16:
            raise ValueError(f"model.max_model_len must be >= 16, got {self.max_model_len}")


@dataclass
class CacheConfig:
    block_size: int = 16
    cpu_kv_cache_gb: float = 0.25      # KV pool on the CPU
    gpu_memory_utilization: float = 0.85   # fraction of free device memory after weights
    num_blocks: Optional[int] = None   # overrides the memory budget (tests force preemption)
    enable_prefix_caching: bool = True
    # Rows (one per image token) of the encode rank's embedding pool and of prefill's landing
    # pool; None: 2 x model.max_model_len (the largest admissible request fits twice).
    embedding_pool_rows: Optional[int] = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"cache.block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("cache.gpu_memory_utilization must be in (0, 1]")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"cache.num_blocks must be >= 2, got {self.num_blocks}")
        if self.embedding_pool_rows is not None and self.embedding_pool_rows < 1:
            raise ValueError(f"cache.embedding_pool_rows must be >= 1, "
                             f"got {self.embedding_pool_rows}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64             # running requests per step
    max_num_batched_tokens: int = 2048 # token budget per step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("scheduler.max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000                   # 0: a free port
    request_timeout_s: float = 600.0   # a request's whole deadline
    max_concurrent_requests: int = 1024

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"server.port must be in [0, 65535], got {self.port}")


@dataclass
class MediaConfig:
    allowed_local_path: str = ""       # "" : local files refused
    allow_private_urls: bool = False   # loopback / private / link-local hosts
    fetch_timeout_s: float = 10.0
    max_image_mb: float = 20.0         # bytes fetched per image
    max_redirects: int = 3
    max_image_pixels: int = 50_000_000 # decompression-bomb cap
    max_file_size_mb: float = 50.0     # pre-computed embedding files
    max_images_per_request: int = 16
    # Decoded pixels (RGB bytes) the frontend holds: per request (413 above it) and for all
    # requests being prepared or dispatched together (429 while full); decoding threads.
    max_request_image_mb: float = 512.0
    max_inflight_image_mb: float = 2048.0
    max_decode_threads: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.max_request_image_mb <= self.max_inflight_image_mb:
            raise ValueError("media.max_request_image_mb must be in (0, "
                             "media.max_inflight_image_mb]")
        if self.max_decode_threads < 1:
            raise ValueError("media.max_decode_threads must be >= 1")


AUTO = "auto"


@dataclass
class GroupConfig:
    instances: Any = 1                 # an int, or "auto": the ranks the other groups leave
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.instances, str) and self.instances != AUTO:
            try:
                self.instances = int(self.instances)
            except ValueError:
                raise ValueError(f"instances must be an integer or 'auto', "
                                 f"got {self.instances!r}") from None
        if isinstance(self.instances, bool) or not (self.auto or isinstance(self.instances, int)):
            raise ValueError(f"instances must be an integer or 'auto', got {self.instances!r}")
        if (not self.auto and self.instances < 0) or self.tp < 1 or self.ep < 1:
            raise ValueError(f"bad group sizes: instances={self.instances} tp={self.tp} ep={self.ep}")

    @property
    def auto(self) -> bool:
        return self.instances == AUTO

    @property
    def num_ranks(self) -> int:
        """Ranks of its instances (`auto`: at least one instance's)."""
        return (1 if self.auto else self.instances) * self.tp


DEPLOYMENT_GROUPS = {   # deployment name -> the groups it uses, in rank order
    "agg": ("aggregated",),
    "ep_d": ("prefill", "decode"),          # prefill also encodes
    "e_p_d": ("encode", "prefill", "decode"),
}


@dataclass
class DeploymentConfig:
    """Groups of instances. `agg` uses `aggregated` only; `ep_d` prefill(+encode) and decode;
    `e_p_d` encode, prefill and decode. Groups a deployment does not use must have 0 instances."""
    name: str = "agg"
    aggregated: GroupConfig = field(default_factory=lambda: GroupConfig(instances=1))
    encode: GroupConfig = field(default_factory=lambda: GroupConfig(instances=0))
    prefill: GroupConfig = field(default_factory=lambda: GroupConfig(instances=0))
    decode: GroupConfig = field(default_factory=lambda: GroupConfig(instances=0))
    # rank 0 runs the frontend beside its worker; None (auto, see Config): on GPU clusters yes
    # (the frontend never takes a GPU of its own), on CPU alone
    frontend_shares_rank: Optional[bool] = True
    allow_cross_node_instances: bool = False
    # Routing (mmhpc.roles.router): a request whose prompt prefix (or images) an instance
    # holds counts as this many queued requests fewer there; 0: least loaded only.
    cache_affinity: float = 2.0

    def __post_init__(self) -> None:
        if not self.cache_affinity >= 0:
            raise ValueError(f"deployment.cache_affinity must be >= 0, got {self.cache_affinity}")
        if self.name not in DEPLOYMENT_GROUPS:
            raise ValueError(f"deployment.name must be one of {sorted(DEPLOYMENT_GROUPS)}, "
                             f"got {self.name!r}")
        used = DEPLOYMENT_GROUPS[self.name]
        for g in ("aggregated", "encode", "prefill", "decode"):
            gc = getattr(self, g)
            if g in used and not gc.auto and gc.instances < 1:
                raise ValueError(f"deployment {self.name} needs deployment.{g}.instances >= 1")
            if g not in used and (gc.auto or gc.instances):
                raise ValueError(f"deployment {self.name} does not use {g}: "
                                 f"set deployment.{g}.instances=0")
        auto = [g for g in used if getattr(self, g).auto]
        if len(auto) > 1:
            raise ValueError(f"only one group may have instances=auto, got {', '.join(auto)}")

    @property
    def groups(self) -> tuple[str, ...]:
        return DEPLOYMENT_GROUPS[self.name]

    def group(self, name: str) -> GroupConfig:
        return getattr(self, name)

    @property
    def num_worker_ranks(self) -> int:
        return sum(self.group(g).num_ranks for g in self.groups)

    @property
    def num_ranks(self) -> int:
        """Ranks the deployment needs (at least, with an `auto` group): workers, plus rank 0
        alone if it does not share."""
        return self.num_worker_ranks + (0 if self.frontend_shares_rank else 1)

    @property
    def auto_group(self) -> str | None:
        return next((g for g in self.groups if self.group(g).auto), None)

    def fill(self, world_size: int) -> "DeploymentConfig":
        """A copy whose `auto` group takes the ranks the others leave (itself if none is
        auto). Raises ValueError (one line) when not one instance of it fits."""
        g = self.auto_group
        if g is None:
            return self
        gc = self.group(g)
        left = world_size - (self.num_ranks - gc.tp)
        if left < gc.tp or left % gc.tp:
            raise ValueError(f"deployment.{g}.instances=auto: {world_size} ranks leave {left} "
                             f"for {g} instances of tp={gc.tp}: run with "
                             f"-n {self.num_ranks - gc.tp + gc.tp * max(1, -(-left // gc.tp))}")
        return dataclasses.replace(self, **{g: dataclasses.replace(gc, instances=left // gc.tp)})


@dataclass
class ClusterConfig:
    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0             # 0: CPU
    gpu_memory_gb: float = 0.0         # one GPU's memory; > 0: layouts are checked to hold the weights
    zmq_port_base: int = 0             # 0: free ports
    host_addr: str = ""                # "": this node's address (127.0.0.1 on one node)
    # the network other nodes reach this one on: an interface name (ib0, hsn0, eth0; a comma
    # list, first present wins) or a CIDR (10.0.0.0/8); "": the node name's address
    interface: str = ""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"cluster.nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"cluster.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if not 0 <= self.zmq_port_base < 65536:
            raise ValueError(f"cluster.zmq_port_base must be in [0, 65535], "
                             f"got {self.zmq_port_base}")

    @property
    def world_size(self) -> int | None:
        """Ranks of a full allocation (one per GPU); None on CPU clusters (the launcher decides)."""
        return self.nodes * self.gpus_per_node if self.gpus_per_node else None


@dataclass
class TimeoutConfig:
    encode_s: float = 60.0
    prefill_s: float = 120.0
    kv_transfer_s: float = 30.0
    kv_lease_s: float = 60.0           # prefill frees unclaimed blocks after this
    heartbeat_s: float = 2.0
    dead_rank_s: float = 10.0
    engine_stall_s: float = 120.0      # a rank whose engine loop is stuck this long is dead
    collective_s: float = 600.0        # a TP/EP collective stuck this long raises
    startup_s: float = 600.0           # model load + the start-up exchange

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"timeouts.{f.name} must be > 0, got {getattr(self, f.name)}")
        if self.dead_rank_s <= self.heartbeat_s:
            raise ValueError("timeouts.dead_rank_s must exceed timeouts.heartbeat_s")


@dataclass
class EngineConfig:
    """Which engine serves the roles (mmhpc.engine.interface, docs/ENGINE.md)."""
    backend: str = "native"            # native | transformers (HF model; agg, tp=1 only)

    def __post_init__(self) -> None:
        if self.backend not in ("native", "transformers"):
            raise ValueError(f"engine.backend must be native|transformers, got {self.backend!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)

    def __post_init__(self) -> None:
        if self.engine.backend == "transformers":
            d = self.deployment
            if d.name != "agg" or d.aggregated.tp != 1:
                raise ValueError("engine.backend=transformers serves deployment=agg with "
                                 "deployment.aggregated.tp=1 only (it implements the "
                                 "aggregated engine, not prefill/decode/encode, and no TP)")
        if self.deployment.frontend_shares_rank is None:   # auto
            self.deployment.frontend_shares_rank = (self.deployment.name == "agg"
                                                    or self.cluster.gpus_per_node > 0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return _build(cls, d)

    @classmethod
    def from_dictconfig(cls, cfg: Any) -> "Config":
        """From Hydra's composed DictConfig (interpolations resolved)."""
        from omegaconf import OmegaConf
        return cls.from_dict(OmegaConf.to_container(cfg, resolve=True))


def _build(tp: Any, value: Any) -> Any:
    """Recursively build a dataclass from a plain dict, rejecting unknown keys."""
    if not dataclasses.is_dataclass(tp):
        return value
    if isinstance(value, tp):
        return value
    hints = {f.name: f for f in dataclasses.fields(tp)}
    unknown = set(value) - set(hints)
    if unknown:
        raise ValueError(f"unknown config keys for {tp.__name__}: {sorted(unknown)}")
    kwargs = {}
    for name, f in hints.items():
        if name not in value:
            continue
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        kwargs[name] = _build(type(sub), value[name]) if dataclasses.is_dataclass(sub) else value[name]
    return tp(**kwargs)
