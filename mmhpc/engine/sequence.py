"""A request's life inside the engine: its tokens, its multimodal items, its blocks.

No torch here: the scheduler and block manager import this module. Tensors (embeddings,
M-RoPE positions) hang off `MMItem.embeddings` / `Sequence.mrope_positions` as opaque objects
that only the model runner touches.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 → off
    min_p: float = 0.0                # drop tokens below min_p × the top token's probability
    seed: int | None = None           # per-request generator: same seed, same tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None       # None: none; k: the chosen token's logprob + top-k
    # Penalties and bias as vLLM applies them, in this order, before temperature: logit_bias
    # {token id: added to its logit}; repetition_penalty (HF's): a logit of a token already in
    # the prompt or output is divided by it where positive, multiplied where not;
    # frequency_penalty × the token's count in the output and presence_penalty once for a
    # token in the output are subtracted (OpenAI's). Logprobs stay those of the model.
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], "
                             f"got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")

    @property
    def penalized(self) -> bool:
        """Logits depend on the tokens so far (or a bias): the sampler adjusts this row."""
        return bool(self.repetition_penalty != 1.0 or self.frequency_penalty
                    or self.presence_penalty or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class MMItem:
    """One image (or pre-computed embedding) inside a prompt.

    The prompt's token ids already hold `num_tokens` placeholder ids at `offset`; the model
    runner overwrites those rows of the input embeddings with `embeddings` ([num_tokens, hidden]).
    `pixel_values`/`grid_thw` are the processor's outputs, present until encoded.
    """
    content_hash: str                 # full-width hash of the decoded content (sha256 hex)
    offset: int                       # index of the first placeholder token in the prompt
    num_tokens: int
    grid_thw: tuple[int, int, int] | None = None   # Qwen2-VL (t, h, w) in patches
    pixel_values: Any = None          # processor output for this item (torch tensor)
    image_size: tuple[int, int] | None = None      # LLaVA-NeXT: the image's (height, width)
    embeddings: Any = None            # [num_tokens, hidden] (torch tensor), set by encode
    source: Any = None                # pre-computed embeddings: the file they came from (the
                                      # frontend's media.Embeddings), to ship it to other ranks


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS, stop string or stop token
    LENGTH = "length"        # max_tokens
    ABORT = "abort"          # cancelled by the client or the frontend
    ERROR = "error"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    mm_items: list[MMItem] = field(default_factory=list)
    arrival: float = 0.0
    # Qwen2-VL: [3, num_prompt_tokens] positions and the offset of generated positions.
    mrope_positions: Any = None
    mrope_delta: int = 0
    # Prefix-cache hashes of the prompt's first full blocks, made by the caller off the engine's
    # thread (`BlockManager.prompt_hashes`); the block manager extends them as it needs.
    block_hashes: list[int] | None = None

    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0      # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0        # prompt tokens served from the prefix cache (first admission)
    error: str | None = None          # why, when finish_reason is ERROR

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building token_ids (a decode step's one token)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r} {self.status.value} prompt={self.num_prompt_tokens} "
                f"out={len(self.output_token_ids)} computed={self.num_computed_tokens} "
                f"blocks={len(self.block_table)})")
