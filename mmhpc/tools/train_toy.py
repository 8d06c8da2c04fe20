"""Train the default toy model (issue 9): a tiny LLaVA that answers questions about shapes.

    python -m mmhpc.tools.train_toy --out models/mmhpc-toy [--seed 0 --steps N --device cpu|cuda]

The config, byte-level BPE tokenizer, image processor and chat template come from the project's
tiny-checkpoint builder (``mmhpc.tools.tiny.build_tiny("llava", ...)``); this script only picks
the sizes, initialises the weights from ``--seed``, and trains on ``mmhpc.tools.toydata``
(an endless deterministic stream seeded by ``--seed``). The prompt is the chat template's
generation prompt with one image and the question; the loss covers the answer tokens and the
end-of-turn / EOS tokens only. AdamW, warm-up then cosine decay, gradient clipping.

``evaluate(model, processor, n, seed)`` scores greedy ``generate`` per question type on fresh
images; it is reused by the tests and printed at the end of training.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mmhpc.tools import toydata

# Training mix of question types (QTYPES order: shape, colour, count, describe): shape is the
# slowest to learn, colour the fastest.
QTYPE_WEIGHTS = (0.35, 0.15, 0.25, 0.25)
EVAL_SEED = 12345          # fresh images: never a training seed (training uses --seed)
MAX_NEW_TOKENS = 24

# Sizes handed to the tiny builder (its names): 64 px images, patch 8 -> 64 image tokens.
# vision_intermediate (not a builder size) widens the CLIP MLP from the builder's 2x to 4x.
SIZES = dict(image_size=64, patch_size=8, vision_hidden=128, vision_layers=2,
             hidden=128, layers=3, heads=4, kv_heads=2, intermediate=512, vocab=640, seed=0,
             vision_intermediate=512)


# ----------------------------------------------------------------------------- prompts
def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def continuation(processor, question: str, answer: str) -> str:
    """The text the chat template puts after the generation prompt for ``answer``: the answer
    and its end of turn (e.g. " circle</s>"). Falls back to " answer" + EOS."""
    tok = processor.tokenizer
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    try:
        full = processor.apply_chat_template(
            user + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            tokenize=False)
    except Exception:      # template without an assistant turn
        full = ""
    if full.startswith(prompt) and answer in full[len(prompt):]:
        tail = full[len(prompt):]
    else:
        tail = " " + answer
    if tok.eos_token and tok.eos_token not in tail:
        tail = tail + tok.eos_token
    return tail


def stop_token_ids(processor) -> list[int]:
    """Special tokens ending an answer (end of turn / EOS)."""
    tok = processor.tokenizer
    tail = continuation(processor, "Q", "A")
    ids = tok(tail, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    stops = {i for i in ids if i in special}
    if tok.eos_token_id is not None:
        stops.add(tok.eos_token_id)
    return sorted(stops)


class Batcher:
    """Turns toydata samples into model inputs with answer-only labels."""

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.prompts = {q: prompt_text(processor, q) for q in toydata.QUESTIONS.values()}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None \
            else self.tok.eos_token_id
        self._ans: dict[str, list[int]] = {}

    def answer_ids(self, question: str, answer: str) -> list[int]:
        key = question + "\0" + answer
        if key not in self._ans:
            self._ans[key] = self.tok(continuation(self.processor, question, answer),
                                      add_special_tokens=False)["input_ids"]
        return self._ans[key]

    def __call__(self, samples):
        enc = self.processor(images=[s.image for s in samples],
                             text=[self.prompts[s.question] for s in samples],
                             return_tensors=None, padding=False)
        seqs, labels = [], []
        for ids, s in zip(enc["input_ids"], samples):
            ids = list(ids)
            ans = self.answer_ids(s.question, s.answer)
            seqs.append(ids + ans)
            labels.append([-100] * len(ids) + ans)
        width = max(len(x) for x in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (x, y) in enumerate(zip(seqs, labels)):
            input_ids[i, :len(x)] = torch.tensor(x)
            attn[i, :len(x)] = 1
            lab[i, :len(y)] = torch.tensor(y)
        pixel_values = torch.as_tensor(__import__("numpy").stack(enc["pixel_values"]))
        return dict(input_ids=input_ids, attention_mask=attn, labels=lab,
                    pixel_values=pixel_values)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate_answers(model, processor, samples, batch_size: int = 50,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy HF generate for each sample's (image, question); the decoded new text."""
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    stops = stop_token_ids(processor)
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            enc = processor(images=[s.image for s in chunk],
                            text=[prompt_text(processor, s.question) for s in chunk],
                            return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=stops, pad_token_id=tok.pad_token_id
                                 if tok.pad_token_id is not None else stops[0])
            new = gen[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
    return out


def evaluate(model, processor, n: int = 200, seed: int = EVAL_SEED, batch_size: int = 50,
             verbose: bool = False) -> dict[str, dict[str, float]]:
    """Per-question-type accuracy of greedy generate on ``toydata.dataset(n, seed)``."""
    was_training = model.training
    model.eval()
    samples = toydata.dataset(n, seed)
    preds = generate_answers(model, processor, samples, batch_size=batch_size)
    model.train(was_training)
    return toydata.score(samples, preds, verbose=verbose)


# ----------------------------------------------------------------------------- training
def build_base(workdir: Path, sizes: dict) -> Path:
    """The untrained tiny LLaVA checkpoint dir (config, tokenizer, processor) from the builder."""
    from mmhpc.tools.tiny import build_tiny
    return Path(build_tiny("llava", workdir / "base", **sizes))


def answer_loss(model, batch, per_sample: bool = True):
    """Cross-entropy on the answer tokens. ``per_sample``: each sample's mean over its own
    answer tokens, then the batch mean (a one-word answer weighs as much as a description);
    else the plain mean over all answer tokens (HF's loss)."""
    if not per_sample:
        return model(**batch).loss
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1),
        reduction="none").view(labels.shape)
    per = (ce * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per.mean()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(out: Path, seed: int = 0, steps: int = 4000, batch_size: int = 32, lr: float = 3e-4,
          warmup: int = 100, weight_decay: float = 0.01, device: str = "cpu",
          threads: int | None = None, eval_every: int = 0, eval_n: int = 200,
          sizes: dict | None = None, log_every: int = 50, per_sample: bool = True,
          qtype_weights=QTYPE_WEIGHTS, eval_seed: int = EVAL_SEED) -> dict:
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    sizes = dict(SIZES, **(sizes or {}))
    vision_intermediate = sizes.pop("vision_intermediate", None)
    out = Path(out)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(Path(tmp), sizes)
        config = AutoConfig.from_pretrained(base)
        processor = AutoProcessor.from_pretrained(base)
        config.vision_feature_layer = -1       # use the whole (tiny) vision tower
        if vision_intermediate:
            config.vision_config.intermediate_size = int(vision_intermediate)
        torch.manual_seed(seed)
        random.seed(seed)
        model = LlavaForConditionalGeneration(config).to(device)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"params: {n_params / 1e6:.2f} M  device={device}  threads={torch.get_num_threads()}",
              flush=True)
        batcher = Batcher(processor)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.98), eps=1e-8)
        stream = toydata.iter_samples(seed, weights=qtype_weights)
        t0 = time.time()
        ema = None
        history = []
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, lr, warmup)
            batch = batcher([next(stream) for _ in range(batch_size)])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = answer_loss(model, batch, per_sample=per_sample)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            if (step + 1) % log_every == 0 or step == 0:
                el = time.time() - t0
                print(f"step {step + 1}/{steps} loss {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                      f"{el:.0f}s ({el / (step + 1):.3f} s/step)", flush=True)
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                tab = evaluate(model, processor, n=eval_n)
                history.append({"step": step + 1, "time_s": time.time() - t0,
                                **{q: r["accuracy"] for q, r in tab.items()}})
                print("eval", json.dumps(history[-1]), flush=True)
        train_s = time.time() - t0
        model.eval()
        model = model.to("cpu")
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        # the builder's tokenizer, processor, chat template and generation files, verbatim
        for f in base.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
                shutil.copy(f, out / f.name)
        from mmhpc.tools.tiny import _portable_configs
        _portable_configs(out)
    table = evaluate(model, processor, n=eval_n, seed=eval_seed, verbose=True)
    print(toydata.format_table(table))
    if vision_intermediate:
        sizes["vision_intermediate"] = vision_intermediate
    info = {"seed": seed, "qtype_weights": qtype_weights, "steps": steps, "batch_size": batch_size, "lr": lr, "device": device,
            "threads": torch.get_num_threads(), "train_s": round(train_s, 1),
            "total_s": round(time.time() - t_start, 1), "params": n_params,
            "sizes": sizes, "eval": table, "history": history}
    print(json.dumps({k: v for k, v in info.items() if k not in ("eval", "history")}))
    (out / "toy_training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/mmhpc-toy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--token-mean", action="store_true",
                    help="loss: mean over all answer tokens instead of per-sample means")
    ap.add_argument("--qtype-weights", default=",".join(map(str, QTYPE_WEIGHTS)),
                    help="training frequencies of shape,colour,count,describe")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--sizes", default="{}", help="JSON overrides of SIZES")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        torch.backends.cudnn.deterministic = True
    train(Path(a.out), seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
          device=a.device, threads=a.threads, eval_every=a.eval_every, eval_n=a.eval_n,
          sizes=json.loads(a.sizes), log_every=a.log_every,
          warmup=a.warmup, per_sample=not a.token_mean,
          qtype_weights=tuple(float(x) for x in a.qtype_weights.split(",")),
          eval_seed=a.eval_seed)


if __name__ == "__main__":
    main()
