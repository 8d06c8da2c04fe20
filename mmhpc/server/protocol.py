"""OpenAI wire format: request parsing/validation into SamplingParams, response and SSE builders.

No aiohttp and no torch here: every function maps plain JSON to plain JSON (or dataclasses), so
the validation table is testable without a server. Every rejection is an `APIError`, which the
app turns into `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from mmhpc.engine.outputs import RequestOutput, TokenLogprob
from mmhpc.engine.sequence import SamplingParams

MAX_N = 16
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024
MAX_STOP_IDS = 64
ROLES = ("system", "developer", "user", "assistant", "tool")
IMAGE_PART_TYPES = ("image_url", "input_image", "image_embeds")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", code="invalid_json")
    return body


# ----------------------------------------------------------------------------- field helpers
def _int(body: dict, key: str, lo: int, hi: int, default: Any = None) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{key}' must be an integer", param=key)
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be in [{lo}, {hi}], got {v}", param=key)
    return v


def _float(body: dict, key: str, lo: float, hi: float, default: Any = None) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise bad(f"'{key}' must be a number", param=key)
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be in [{lo}, {hi}], got {v}", param=key)
    return float(v)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean", param=key)
    return v


@dataclass
class Sampling:
    """Sampling fields of a request, before the prompt length fixes the default max_tokens."""
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: Optional[int] = None
    n: int = 1
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def params(self, num_prompt_tokens: int, max_model_len: int, index: int = 0,
               prompt_param: str = "messages") -> SamplingParams:
        """SamplingParams for choice `index`: seeds derive from `seed` so n>1 choices differ."""
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise bad(f"prompt is {num_prompt_tokens} tokens (images included); this model's "
                      f"maximum context length is {max_model_len}", param=prompt_param,
                      code="context_length_exceeded")
        max_tokens = room if self.max_tokens is None else self.max_tokens
        if max_tokens > room:
            raise bad(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds "
                      f"the maximum context length {max_model_len}", param="max_tokens",
                      code="context_length_exceeded")
        if self.min_tokens > max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) > max_tokens ({max_tokens})",
                      param="min_tokens")
        seed = None if self.seed is None else (self.seed + index) % (1 << 63)
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, seed=seed,
                              stop=list(self.stop), stop_token_ids=list(self.stop_token_ids),
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                              logprobs=self.logprobs, repetition_penalty=self.repetition_penalty,
                              frequency_penalty=self.frequency_penalty,
                              presence_penalty=self.presence_penalty,
                              logit_bias=dict(self.logit_bias))


def _sampling(body: dict, logprobs: Optional[int], vocab_size: Optional[int]) -> Sampling:
    max_tokens = _int(body, "max_completion_tokens", 1, 1 << 31)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, 1 << 31)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("'stop' must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise bad(f"'stop' takes 1 to {MAX_STOP} non-empty strings", param="stop")
    repetition = _float(body, "repetition_penalty", 0.0, 10.0, 1.0)
    if repetition <= 0:
        raise bad("'repetition_penalty' must be > 0 (1: off)", param="repetition_penalty")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_float(body, "top_p", 1e-9, 1.0, 1.0),
        top_k=max(0, _int(body, "top_k", -1, 1 << 20, 0)),
        min_p=_float(body, "min_p", 0.0, 1.0, 0.0),
        stop_token_ids=_token_ids(body, "stop_token_ids", vocab_size),
        seed=_int(body, "seed", -(1 << 63), (1 << 63) - 1),
        stop=stop,
        ignore_eos=_bool(body, "ignore_eos"),
        min_tokens=_int(body, "min_tokens", 0, 1 << 31, 0),
        logprobs=logprobs,
        n=_int(body, "n", 1, MAX_N, 1),
        repetition_penalty=repetition,
        frequency_penalty=_float(body, "frequency_penalty", -2.0, 2.0, 0.0),
        presence_penalty=_float(body, "presence_penalty", -2.0, 2.0, 0.0),
        logit_bias=_logit_bias(body, vocab_size),
    )


def _token_ids(body: dict, key: str, vocab_size: Optional[int]) -> list[int]:
    raw = body.get(key)
    if raw is None:
        return []
    if not (isinstance(raw, list) and len(raw) <= MAX_STOP_IDS
            and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)):
        raise bad(f"'{key}' must be a list of at most {MAX_STOP_IDS} token ids", param=key)
    if any(t < 0 or (vocab_size is not None and t >= vocab_size) for t in raw):
        raise bad(f"'{key}': token ids must be in [0, {vocab_size})", param=key)
    return list(raw)


def _logit_bias(body: dict, vocab_size: Optional[int]) -> dict[int, float]:
    """OpenAI's {"token id": bias in [-100, 100]}."""
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad("'logit_bias' must be an object of token id -> bias", param="logit_bias")
    if len(raw) > MAX_LOGIT_BIAS:
        raise bad(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    out = {}
    for key, bias in raw.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise bad(f"'logit_bias' key {key!r} is not a token id", param="logit_bias") from None
        if tid < 0 or (vocab_size is not None and tid >= vocab_size):
            raise bad(f"'logit_bias' token id {tid} is not in [0, {vocab_size})",
                      param="logit_bias")
        if (isinstance(bias, bool) or not isinstance(bias, (int, float))
                or not -100 <= bias <= 100):            # NaN fails the range too
            raise bad(f"'logit_bias' of token {tid} must be a number in [-100, 100]",
                      param="logit_bias")
        out[tid] = float(bias)
    return out


# Fields that would change what the client gets back, which this server does not do: refused
# with a 400 naming them rather than ignored. Each: (key, "in use" test, what to do instead).
_UNSUPPORTED = (
    ("tools", lambda v: bool(v), "tool calling is not supported: send no 'tools'"),
    ("functions", lambda v: bool(v), "function calling is not supported"),
    ("tool_choice", lambda v: v not in ("none", "auto"), "tool calling is not supported"),
    ("function_call", lambda v: v not in ("none", "auto"), "function calling is not supported"),
    ("response_format", lambda v: not (isinstance(v, dict) and v.get("type") in (None, "text")),
     "structured output is not supported: use response_format {\"type\": \"text\"}"),
    ("modalities", lambda v: v != ["text"], "only text output is supported"),
    ("audio", lambda v: True, "audio output is not supported"),
    ("suffix", lambda v: v != "", "'suffix' is not supported"),
    ("best_of", lambda v: v != 1, "'best_of' is not supported: use 'n'"),
)


def _refuse_unsupported(body: dict) -> None:
    for key, used, why in _UNSUPPORTED:
        if body.get(key) is not None and used(body[key]):       # null: not sent
            raise bad(why, param=key, code="unsupported_parameter")


def check_model(body: dict, served: str) -> str:
    """The request's model (default: the served one), after refusing fields not honoured."""
    _refuse_unsupported(body)           # every request parser starts here
    model = body.get("model")
    if model is None:
        return served
    if not isinstance(model, str):
        raise bad("'model' must be a string", param="model")
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist (this server serves '{served}')",
                       param="model", code="model_not_found")
    return model


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", param="stream_options")
    return stream, _bool(opts, "include_usage")


# ----------------------------------------------------------------------------- chat requests
@dataclass
class MediaRef:
    """One image part of a chat request: a URL (http, data:, file:, path) to an image or to a
    pre-computed embeddings file."""
    url: str
    param: str                        # where it sits in the request, for error messages


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]              # processor form: parts {"type": "text"} / {"type": "image"}
    media: list[MediaRef]
    sampling: Sampling
    stream: bool
    include_usage: bool
    logprobs: bool


def _image_url(part: dict, param: str) -> str:
    kind = part["type"]
    v = part.get(kind)
    if isinstance(v, dict):
        v = v.get("url")
    if not isinstance(v, str) or not v:
        raise bad(f"{param}.{kind} must be a URL string or an object with a 'url'",
                  param=f"{param}.{kind}")
    return v


def parse_chat(body: dict, served_model: str, max_images: int,
               vocab_size: Optional[int] = None) -> ChatRequest:
    model = check_model(body, served_model)
    raw = body.get("messages")
    if raw is None:
        raise bad("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", param="messages")
    messages: list[dict] = []
    media: list[MediaRef] = []
    for i, msg in enumerate(raw):
        p = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(f"{p} must be an object", param=p)
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"{p}.role must be one of {list(ROLES)}, got {role!r}", param=f"{p}.role")
        content = msg.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            parts: list[dict] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pp = f"{p}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad(f"{pp}.text must be a string", param=f"{pp}.text")
                    parts.append({"type": "text", "text": part["text"]})
                elif kind in IMAGE_PART_TYPES:
                    media.append(MediaRef(_image_url(part, pp), pp))
                    parts.append({"type": "image"})
                else:
                    raise bad(f"{pp}: unsupported content part type {kind!r} "
                              f"(supported: text, {', '.join(IMAGE_PART_TYPES)})", param=pp,
                              code="unsupported_content_type")
        else:
            raise bad(f"{p}.content must be a string or a list of parts", param=f"{p}.content")
        messages.append({"role": "system" if role == "developer" else role, "content": parts})
    if len(media) > max_images:
        raise bad(f"{len(media)} images in one request; at most {max_images} are allowed",
                  param="messages", code="too_many_images")
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 20)
    if top is not None and not logprobs:
        raise bad("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    stream, include_usage = _stream(body)
    sampling = _sampling(body, (top or 0) if logprobs else None, vocab_size)
    return ChatRequest(model, messages, media, sampling, stream, include_usage, logprobs)


# ----------------------------------------------------------------------------- completions
@dataclass
class CompletionRequest:
    model: str
    prompts: list[Any]                # each a str or a list of token ids
    sampling: Sampling
    stream: bool
    include_usage: bool
    echo: bool


def parse_completion(body: dict, served_model: str, vocab_size: int) -> CompletionRequest:
    model = check_model(body, served_model)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("'prompt' must be a string, a list of strings or a list of token ids",
                  param="prompt")
    if len(prompts) > MAX_N:
        raise bad(f"at most {MAX_N} prompts per request", param="prompt")
    for p in prompts:
        if isinstance(p, list) and any(not 0 <= t < vocab_size for t in p):
            raise bad(f"token ids must be in [0, {vocab_size})", param="prompt")
    if _bool(body, "echo"):
        raise bad("'echo' is not supported", param="echo", code="unsupported_parameter")
    logprobs = _int(body, "logprobs", 0, 20)
    stream, include_usage = _stream(body)
    sampling = _sampling(body, logprobs, vocab_size)
    if len(prompts) * sampling.n > MAX_N:
        raise bad(f"len(prompt) * n must be <= {MAX_N}", param="n")
    return CompletionRequest(model, prompts, sampling, stream, include_usage, False)


# ----------------------------------------------------------------------------- responses
def usage(num_prompt: int, num_completion: int, num_cached: int = 0) -> dict:
    u = {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
         "total_tokens": num_prompt + num_completion}
    if num_cached:
        u["prompt_tokens_details"] = {"cached_tokens": num_cached}
    return u


def finish_reason(out: RequestOutput) -> Optional[str]:
    if not out.finished:
        return None
    return out.finish_reason if out.finish_reason in ("stop", "length") else "stop"


def chat_logprobs(lps: list[TokenLogprob], token_str) -> dict:
    def one(tid: int, lp: float) -> dict:
        s = token_str(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**one(t.token_id, t.logprob),
                         "top_logprobs": [one(i, lp) for i, lp in t.top]} for t in lps]}


def completion_logprobs(lps: list[TokenLogprob], token_str, text_offset: int = 0) -> dict:
    tokens, offsets, pos = [], [], text_offset
    for t in lps:
        s = token_str(t.token_id)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{token_str(i): lp for i, lp in t.top} for t in lps],
            "text_offset": offsets}


CHAT, CHAT_CHUNK, COMPLETION = "chat.completion", "chat.completion.chunk", "text_completion"


def response(obj: str, rid: str, model: str, choices: list[dict], u: Optional[dict] = None,
             created: Optional[int] = None) -> dict:
    """The envelope of every response and stream chunk (`obj`: CHAT, CHAT_CHUNK or COMPLETION,
    which also names completion chunks); "usage" only where `u` is given."""
    body = {"id": rid, "object": obj, "created": int(time.time()) if created is None else created,
            "model": model, "choices": choices}
    if u is not None:
        body["usage"] = u
    return body


def chat_choice(index: int, text: str, reason: Optional[str], logprobs: Optional[dict]) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": reason}


def chat_delta(index: int, delta: dict, reason: Optional[str] = None,
               logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def completion_choice(index: int, text: str, reason: Optional[str],
                      logprobs: Optional[dict]) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def sse(data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
