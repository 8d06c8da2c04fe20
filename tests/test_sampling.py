"""Sampler, detokenizer and engine sampling behaviour (CPU, tiny checkpoint)."""
from __future__ import annotations

import pytest
import torch

from mmhpc.engine.detokenizer import IncrementalDetokenizer
from mmhpc.engine.sampler import Sampler
from mmhpc.engine.sequence import SamplingParams, Sequence

torch.set_num_threads(1)


def _seq(rid="r", **params):
    return Sequence(rid, [1, 2, 3], SamplingParams(**params))


def test_greedy_and_top_k_1_agree():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seqs = [_seq("a"), _seq("b", temperature=1.0, top_k=1, seed=3), _seq("c", temperature=0.7, top_p=1e-6)]
    out = Sampler()(logits, seqs)
    best = logits.argmax(-1).tolist()
    assert [out[s.request_id][0] for s in seqs] == best


def test_seed_reproducible_and_seeds_differ():
    logits = torch.zeros(1, 1000)                      # uniform: 20 draws collide with p ~ 0
    def draws(seed):
        sampler, seq = Sampler(), _seq(temperature=1.0, seed=seed)
        return [sampler(logits, [seq])["r"][0] for _ in range(20)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler()
    seq = _seq(temperature=1.0, top_p=0.7, seed=0)
    assert {sampler(logits, [seq])["r"][0] for _ in range(200)} == {0, 1}


def test_min_p_drops_the_unlikely():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler()
    seq = _seq(temperature=1.0, min_p=0.4, seed=0)          # keeps p >= 0.4 * 0.5 = 0.2
    assert {sampler(logits, [seq])["r"][0] for _ in range(300)} == {0, 1}
    seq = _seq("s", temperature=1.0, min_p=0.25, seed=0)    # keeps p >= 0.125
    assert {sampler(logits, [seq])["s"][0] for _ in range(300)} == {0, 1, 2}


def test_min_tokens_masks_eos_and_logprobs():
    logits = torch.tensor([[0.0, 0.0, 9.0, 1.0]])       # token 2 is EOS and the argmax
    seq = _seq(min_tokens=2, logprobs=2)
    tok, lp = Sampler(eos_token_ids=[2])(logits, [seq])["r"]
    assert tok == 3
    ref = torch.log_softmax(logits[0], -1)
    assert lp.logprob == pytest.approx(float(ref[3])) and [t for t, _ in lp.top] == [2, 3]


def _penalized_reference(logits, prompt, output, p):
    """vLLM's definitions, written out: bias, repetition over prompt + output, then
    frequency and presence over the output."""
    row = logits.clone()
    for t, b in p.logit_bias.items():
        row[t] += b
    for t in set(prompt) | set(output):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return row


PENALTIES = [dict(frequency_penalty=0.7), dict(presence_penalty=1.5),
             dict(frequency_penalty=-0.4, presence_penalty=0.3),
             dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5,
                  logit_bias={5: 2.0, 6: -1.0})]


@pytest.mark.parametrize("kw", PENALTIES, ids=lambda kw: "+".join(kw))
def test_penalties_as_defined_and_logprobs_raw(kw):
    g = torch.Generator().manual_seed(1)
    sampler = Sampler()
    logits = torch.randn(3, 12, generator=g) * 3               # rows: plain, penalized, plain
    seqs = [Sequence(f"s{i}", [1, 2, 3, 5], SamplingParams(max_tokens=8, logprobs=1,
                                                            **(kw if i == 1 else {})))
            for i in range(3)]
    for s in seqs:
        s.output_token_ids = [4, 7, 7, 9, 4, 7]
    params = seqs[1].params
    ref = _penalized_reference(logits[1], [1, 2, 3, 5], [4, 7, 7, 9, 4, 7], params)
    assert not torch.equal(ref, logits[1])
    before = logits.clone()
    out = sampler(logits, seqs)
    assert torch.equal(logits, before)                           # the caller's logits untouched
    assert out["s1"][0] == int(ref.argmax())
    assert out["s0"][0] == int(logits[0].argmax()) and out["s2"][0] == int(logits[2].argmax())
    # logprobs are the model's (vLLM's default), not the penalized row's
    raw = torch.log_softmax(logits[1], -1)
    assert out["s1"][1].logprob == pytest.approx(float(raw[out["s1"][0]]))


def test_penalized_sampling_draws_from_the_penalized_row():
    logits = torch.tensor([[5.0, 5.0, -30.0]])
    seq = Sequence("r", [9], SamplingParams(temperature=1.0, seed=0, presence_penalty=2.0,
                                            frequency_penalty=2.0, max_tokens=50))
    seq.output_token_ids = [0]              # token 0: 5 - 2 - 2 = 1 against token 1's 5
    sampler = Sampler()                     # seeded: the same 2000 draws every run
    draws = [sampler(logits, [seq])["r"][0] for _ in range(2000)]
    assert 0.008 < draws.count(0) / 2000 < 0.035    # e^-4 / (1 + e^-4) ~ 0.018; unpenalized 0.5


class _Tok:
    """Character-level fake tokenizer: id = ord(char)."""
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("stop,expect", [(["STOP"], "hello "), (["lo", "STOP"], "hel"), ([], "hello STOP now")])
def test_detokenizer_stop_strings_are_excluded(stop, expect):
    d = IncrementalDetokenizer(_Tok(), stop)
    text = ""
    for ch in "hello STOP now":
        text += d.add(ord(ch))
        if d.stopped:
            break
    text += d.flush()
    assert text == expect


def test_engine_sampling_seeded(tmp_path):
    from mmhpc.config import CacheConfig, Config, ModelConfig
    from mmhpc.engine.engine import LLMEngine
    from mmhpc.tools.tiny import tiny_checkpoint
    engine = LLMEngine(Config(model=ModelConfig(path=str(tiny_checkpoint("llava"))),
                              cache=CacheConfig(block_size=4, num_blocks=64)))
    prompt = engine.processor.process("USER: hi ASSISTANT:", [])[0]

    def gen(rid, seed):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=12, temperature=1.5, seed=seed,
                                                       ignore_eos=True))
        toks = []
        while engine.has_unfinished_requests():
            toks += [t for o in engine.step() for t in o.new_token_ids]
        return toks
    assert gen("a", 1) == gen("b", 1)
    assert gen("c", 1) != gen("d", 2)


def test_engine_stop_string_excluded_and_streamed():
    from mmhpc.config import CacheConfig, Config, ModelConfig
    from mmhpc.engine.engine import LLMEngine
    from mmhpc.tools.tiny import tiny_checkpoint
    engine = LLMEngine(Config(model=ModelConfig(path=str(tiny_checkpoint("llava"))),
                              cache=CacheConfig(block_size=4, num_blocks=64)))
    prompt = engine.processor.process("USER: tell me ASSISTANT:", [])[0]

    def gen(rid, **kw):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=16, ignore_eos=True, **kw))
        text, reason = "", None
        while engine.has_unfinished_requests():
            for o in engine.step():
                text += o.text_delta
                reason = o.finish_reason or reason
        return text, reason
    full, reason = gen("a")
    assert reason == "length" and len(full) > 6
    stop = full[len(full) // 2:len(full) // 2 + 3]
    text, reason = gen("b", stop=[stop])
    assert reason == "stop" and text == full[:full.find(stop)]


@pytest.mark.parametrize("which", ["tiny:llava", "tiny:qwen2_vl", "toy"])
def test_fast_decode_is_the_tokenizers_decode(which):
    """The detokenizer's direct Rust decode gives tokenizer.decode's text, byte-split and
    special tokens included, and the incremental text equals one decode of all the ids; a
    tokenizer that cleans up spaces keeps transformers' own decode."""
    import copy
    import random
    from pathlib import Path

    from transformers import AutoTokenizer

    from mmhpc.engine.detokenizer import fast_decode
    from mmhpc.tools.tiny import tiny_checkpoint
    path = (Path(__file__).resolve().parents[1] / "models" / "mmhpc-toy" if which == "toy"
            else tiny_checkpoint(which[5:]))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert tok.clean_up_tokenization_spaces is False       # so the direct path is the one used
    rng = random.Random(0)
    ids_sets = [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))] for _ in range(200)]
    ids_sets.append(tok.encode("naïve café — ünïcödé 漢字 🙂 done"))
    cleaning = copy.deepcopy(tok)
    cleaning.clean_up_tokenization_spaces = True
    for decode, ref in ((fast_decode(tok), tok), (fast_decode(cleaning), cleaning)):
        for ids in ids_sets:
            for skip in (True, False):
                assert decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    text = tok.encode("naïve café — ünïcödé 漢字 🙂 done", add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    got = "".join(d.add(t) for t in text) + d.flush()
    assert got == tok.decode(text, skip_special_tokens=True)
