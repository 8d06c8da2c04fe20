"""Offline API: `LLM(path, **overrides).generate(prompts, params) -> list[Completion]`.

A prompt is a string (raw prompt text; `<image>`-style placeholders with `images=`), a list of
OpenAI-style chat messages (image parts `{"type": "image", "image": PIL.Image}`), or a dict
`{"prompt": str | "prompt_token_ids": [...], "images": [...]}`. Overrides are Config sections
(`cache={"num_blocks": 64}`, `engine={"backend": "transformers"}`) or ModelConfig fields
(`max_model_len=512`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmhpc.config import Config, ModelConfig
from mmhpc.engine.sequence import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None


def _config(path: str, overrides: dict[str, Any]) -> Config:
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    sections: dict[str, Any] = {"model": {"path": str(path)}}
    for key, value in overrides.items():
        if key in model_fields:
            sections["model"][key] = value
        elif isinstance(value, dict):
            sections.setdefault(key, {}).update(value)
        else:
            raise ValueError(f"unknown override {key}={value!r}: give a ModelConfig field or a "
                             "Config section as a dict")
    return Config.from_dict(sections)


class LLM:
    def __init__(self, path: str, **overrides: Any):
        from mmhpc.engine.interface import make_engine
        self.engine = make_engine(_config(path, overrides), "aggregated")
        self.processor = self.engine.processor
        self._next_id = 0

    def _inputs(self, prompt: Any):
        proc = self.processor
        if isinstance(prompt, str):
            return proc.process(prompt, [])
        if isinstance(prompt, list):                        # chat messages
            images = [p["image"] for m in prompt if isinstance(m.get("content"), list)
                      for p in m["content"] if p.get("type") == "image" and p.get("image") is not None]
            return proc.process(proc.apply_chat_template(prompt), images)
        if isinstance(prompt, dict):
            images = list(prompt.get("images", ()))
            if "prompt" in prompt:
                return proc.process(prompt["prompt"], images)
            return self._expand(list(prompt["prompt_token_ids"]), images)
        raise TypeError(f"unsupported prompt type {type(prompt).__name__}")

    def _expand(self, ids: list[int], images: list) -> tuple[list[int], list]:
        """Token ids with one placeholder per image (or runs already expanded) + images."""
        image_id = self.processor.image_token_id
        collapsed = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
        if collapsed.count(image_id) != len(images):
            raise ValueError(f"{collapsed.count(image_id)} image placeholder(s), {len(images)} image(s)")
        items = [self.processor.process(self.processor.image_token, [im])[1][0] for im in images]
        out: list[int] = []
        it = iter(items)
        for t in collapsed:
            if t == image_id:
                item = next(it)
                item.offset = len(out)
                out += [image_id] * item.num_tokens
            else:
                out.append(t)
        return out, items

    def generate(self, prompts: Any, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], dict) and "role" in prompts[0]):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = []
        for prompt, p in zip(prompts, params_list):
            token_ids, items = self._inputs(prompt)
            rid = f"llm-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(rid, token_ids, p, items)
            ids.append(rid)
        results = {rid: Completion("", [], None) for rid in ids}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                c = results[out.request_id]
                c.text += out.text_delta
                c.token_ids += out.new_token_ids
                if out.finished:
                    c.finish_reason = out.finish_reason
        return [results[rid] for rid in ids]
