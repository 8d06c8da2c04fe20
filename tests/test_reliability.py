"""One request's trouble stays that request's (issue 19), on real workers in this process
(tiny LLaVA engines, real NIXL agents, no MPI): a full embedding pool makes a request wait
and then fail alone with 429 (an image larger than the pool: 413), never an exception out of
the loop; a decode-side preemption of an image request fails that request alone; an abort
that overtakes the KV hand-off is remembered; a failed step is blamed on its new requests;
the frontend's image budget refuses with 413 / 429; a late frontend loop is not charged to
the ranks; a generation cut mid-character flushes the held-back bytes as HF's decode does.
The same cases under real mpirun, with HF-equal neighbours, are in test_faults.py (slow)."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from mmhpc.config import Config


def _config(**cache) -> Config:
    from mmhpc.tools.tiny import tiny_checkpoint
    return Config.from_dict({"model": {"path": str(tiny_checkpoint("llava")),
                                       "max_model_len": 256},
                             "cache": {"block_size": 4, "num_blocks": 64, **cache},
                             "timeouts": {"encode_s": 0.5}})


def _sent(w) -> list:
    out = []
    while not w.outbox.empty():
        out.append(w.outbox.get_nowait()[1])
    return out


@pytest.fixture()
def encoder():
    from mmhpc.roles.encode import EncodeWorker
    from mmhpc.transport.nixl_agent import NixlAgent
    cfg = _config(embedding_pool_rows=40)
    ctx = SimpleNamespace(rank=1, config=cfg, device="cpu", nixl=NixlAgent("encode-pool"))
    w = EncodeWorker(ctx)
    yield w
    ctx.nixl.close()


def _encode_request(w, rid: str, seeds: list[int], rng_image):
    from mmhpc.messages.to_encode import EncodeRequest, ImageItem
    items = []
    for s in seeds:
        img = rng_image(s, 40, 40)
        mm = w.processor.image_item(img)
        items.append(ImageItem(mm.content_hash, 5, mm.num_tokens, img.tobytes(), "rgb", 40, 40))
    return EncodeRequest(rid, items, prefill_rank=2, deadline=time.time() + 60)


def test_full_embedding_pool_waits_then_refuses_alone(encoder, rng_image):
    w = encoder
    rows = _encode_request(w, "x", [0], rng_image).items[0].num_tokens     # 16 (tiny LLaVA)
    assert w.pool.num_rows == 40 and 2 * rows <= 40 < 3 * rows
    w.handle(0, _encode_request(w, "a", [1, 2], rng_image))                 # fills the pool
    w.tick()
    assert [type(m).__name__ for m in _sent(w)] == ["EmbeddingsReady"] * 2
    w.handle(0, _encode_request(w, "b", [3], rng_image))                    # no room: waits
    w.tick()
    assert not _sent(w) and len(w.blocked) == 1 and w.stats["num_pool_waits"] == 1
    from mmhpc.messages.to_encode import ReleaseEmbeddings
    w.handle(2, ReleaseEmbeddings("a", []))                                 # prefill read them
    w.tick()
    ready = _sent(w)
    assert [(type(m).__name__, m.request_id) for m in ready] == [("EmbeddingsReady", "b")]
    w.handle(0, _encode_request(w, "c", [4, 5], rng_image))   # b pins 576: c never fits now
    w.tick()
    assert not _sent(w)
    time.sleep(0.6)                                                          # > encode_s
    w.tick()
    (failed,) = _sent(w)
    assert (type(failed).__name__, failed.request_id, failed.status) == ("RequestFailed", "c", 429)
    assert "embedding pool full" in failed.message and not w.blocked
    w.handle(0, _encode_request(w, "d", [6], rng_image))                    # the rank goes on
    w.tick()
    assert [m.request_id for m in _sent(w)] == ["d"]


def test_images_larger_than_the_pool_are_refused_with_413(encoder, rng_image):
    w = encoder
    w.handle(0, _encode_request(w, "big", [1, 2, 3], rng_image))            # 48 > 40 rows
    w.tick()
    (failed,) = _sent(w)
    assert failed.status == 413 and "embedding rows" in failed.message
    assert w.pool.num_free_rows == w.pool.num_rows


def test_default_pool_fits_any_admissible_request():
    from mmhpc.roles.embed_pool import embedding_pool_rows
    cfg = _config()
    assert embedding_pool_rows(cfg) == 2 * cfg.model.max_model_len
    with pytest.raises(ValueError):
        _config(embedding_pool_rows=0)


def _remote_seq(rid: str, num_prompt: int, image: bool):
    from mmhpc.engine.sequence import MMItem, SamplingParams, Sequence
    items = [MMItem("h" + rid, 2, 4)] if image else []            # offsets only: decode side
    seq = Sequence(rid, list(range(1, num_prompt + 1)), SamplingParams(max_tokens=64), items)
    seq.output_token_ids.append(7)
    return seq


def test_decode_preemption_fails_only_the_image_request():
    """Decode side: an image request's embeddings stayed on prefill; when blocks run out a
    text request (recomputable) is preempted first, an image one fails alone."""
    from mmhpc.config import CacheConfig, SchedulerConfig
    from mmhpc.engine.scheduler import Scheduler, recomputable
    s = Scheduler(SchedulerConfig(), CacheConfig(block_size=4, num_blocks=8))
    seqs = [_remote_seq("img0", 7, True), _remote_seq("txt", 7, False),
            _remote_seq("img1", 7, True)]
    assert [recomputable(q) for q in seqs] == [False, True, False]
    for q in seqs:                                   # 2 blocks each, then decode
        assert s.reserve_remote(q) is not None or q.request_id == "img1"
    for q in seqs[:2]:
        s.activate_remote(q.request_id)
    out = s.schedule()
    sampled = {x.seq.request_id: 9 for x in out.scheduled}
    s.update(out, sampled)
    preempted, failed = [], []
    for _ in range(40):                              # decode until blocks run out
        out = s.schedule()
        preempted += out.preempted
        failed += [q.request_id for q in out.finished]
        s.update(out, {x.seq.request_id: 9 for x in out.scheduled})
        if failed:
            break
    assert preempted == ["txt", "img0"], preempted   # the text one went first (recomputed)
    assert failed == ["img0"] and "no longer" not in seqs[0].error
    assert "cannot be recomputed" in seqs[0].error and seqs[1].status.value == "waiting"
    assert s.reserved == {"img1": seqs[2]}           # untouched


def test_decode_reserves_an_image_request_its_whole_generation():
    """Where the pool allows it, decode reserves an image request's blocks for prompt +
    max_tokens at once: the text request is preempted when blocks run out, never it."""
    from mmhpc.config import CacheConfig, SchedulerConfig
    from mmhpc.engine.scheduler import Scheduler
    s = Scheduler(SchedulerConfig(), CacheConfig(block_size=4, num_blocks=7))
    img, txt = _remote_seq("img", 7, True), _remote_seq("txt", 7, False)
    img.params.max_tokens = 10                              # 7 + 10 - 1 tokens: 4 blocks
    assert len(s.reserve_remote(img)) == 2 and len(img.block_table) == 4
    assert len(s.reserve_remote(txt)) == 2
    for q in (img, txt):
        s.activate_remote(q.request_id)
    preempted = []
    for _ in range(8):
        out = s.schedule()
        preempted += out.preempted
        assert not out.finished
        s.update(out, {x.seq.request_id: 9 for x in out.scheduled})
    assert preempted == ["txt"] and img.num_tokens == 16 and len(img.block_table) == 4


def test_decode_remembers_an_abort_that_overtakes_the_kv_hand_off():
    from mmhpc.messages.common import AbortRequest
    from mmhpc.messages.to_decode import KVReady
    from mmhpc.roles.decode import DecodeWorker
    from mmhpc.transport.nixl_agent import NixlAgent
    ctx = SimpleNamespace(rank=3, config=_config(), device="cpu", nixl=NixlAgent("decode-abort"))
    try:
        w = DecodeWorker(ctx)
        free = w.engine.scheduler.block_manager.num_free_blocks
        w.handle(0, AbortRequest("r1"))                          # from the frontend, first
        msg = KVReady("r1", list(range(1, 30)), 7, None, [0, 1, 2, 3, 4, 5, 6], 29, [], [], 2,
                      time.time() + 60, time.time() + 60, [], frontend_rank=0)
        w.handle(2, msg)                                         # prefill's hand-off, late
        w.tick()
        sent = _sent(w)
        assert [(type(m).__name__, m.request_id) for m in sent] == [("ReleaseKV", "r1")]
        assert not w.waiting and not w.pulls and not w.active
        assert w.engine.scheduler.block_manager.num_free_blocks == free
        assert not w.engine.has_unfinished_requests()
    finally:
        ctx.nixl.close()


def test_a_failed_step_is_blamed_on_its_new_requests():
    from mmhpc.roles.worker import suspects
    reqs = {"old": 1, "new": 2}
    assert suspects(RuntimeError("x"), reqs, {"old"}) == ["new"]
    assert sorted(suspects(RuntimeError("x"), reqs, {"old", "new"})) == ["new", "old"]
    named = RuntimeError("x")
    named.request_id = "old"
    assert suspects(named, reqs, set()) == ["old"]


def test_image_budget_refuses_per_request_413_and_when_full_429():
    from mmhpc.config import MediaConfig
    from mmhpc.server.image_budget import ImageBudget
    from mmhpc.server.protocol import APIError
    b = ImageBudget(MediaConfig(max_request_image_mb=1, max_inflight_image_mb=1.2))
    img = SimpleNamespace(width=512, height=512)                         # 0.75 MiB as RGB
    with b.hold() as h1:
        h1.take(b.size(img))
        with pytest.raises(APIError) as e:
            h1.take(b.size(img))
        assert e.value.status == 413
        with b.hold() as h2:
            with pytest.raises(APIError) as e:
                h2.take(b.size(img))
            assert e.value.status == 429
    assert b.held == 0


def test_a_late_frontend_loop_is_not_charged_to_the_ranks():
    from mmhpc.config import TimeoutConfig
    from mmhpc.roles.liveness import Liveness
    dead = []
    lv = Liveness(TimeoutConfig(heartbeat_s=0.5, dead_rank_s=3), {1: "encode", 2: "decode"},
                  [1, 2], lambda r, why: dead.append(why))
    now = time.monotonic()
    lv.last_seen = {1: now - 15, 2: now - 15}        # the loop froze for 15 s
    lv.excuse(15.0)
    lv.check(time.monotonic())
    assert not dead and not lv.stalled()
    lv.beat(2, {"loop_stalled_s": 200.0})            # I/O thread beats, the engine loop is stuck
    assert lv.stalled() == ["rank 2 (decode) engine loop stalled for 200.0s"]
    lv.check(time.monotonic())
    assert dead == ["rank 2 (decode) is dead: its engine loop made no progress for 200.0s "
                    "(its I/O thread still answers)"]


@pytest.mark.parametrize("char", ["é", "中", "🙂"])
def test_a_cut_mid_character_flushes_like_hf_decode(tiny_llava, char):
    from transformers import AutoTokenizer
    from mmhpc.engine.detokenizer import IncrementalDetokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llava)
    from tokenizers.pre_tokenizers import ByteLevel
    byte_chars = ByteLevel.alphabet()
    ids = tok.encode("a b", add_special_tokens=False)
    raw = char.encode()
    table = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    assert all(table[b] in byte_chars for b in raw)
    ids += [tok.convert_tokens_to_ids(table[b]) for b in raw[:-1]]      # cut before its last byte
    d = IncrementalDetokenizer(tok)
    text = "".join(d.add(t) for t in ids) + d.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert text.endswith("\ufffd")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet), by byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_requests_after_the_engine_died_get_a_clean_503(tiny_llava):
    """The engine's thread dies (a failure injected into its loop): /health and every new
    request answer 503 with an OpenAI error body, no unhandled error."""
    from imgserver import http
    from mmhpc.server.app import ServerThread
    cfg = Config.from_dict({"model": {"path": str(tiny_llava), "max_model_len": 256},
                            "cache": {"num_blocks": 64},
                            "server": {"host": "127.0.0.1", "port": 0}})
    srv = ServerThread(cfg)
    url = srv.start()
    try:
        client = srv.client

        def broken():
            raise RuntimeError("injected: the engine loop died")
        client.engine.has_unfinished_requests = broken
        client._cmds.put(("abort", "nobody"))           # wake the idle engine thread
        client._thread.join(10)
        assert not client._thread.is_alive()
        for _ in range(3):
            status, body = http("POST", url + "/v1/completions",
                                {"model": tiny_llava.name, "prompt": "hi", "max_tokens": 2})[:2]
            err = json.loads(body)["error"]
            assert status == 503 and err["code"] == "unavailable", body
            assert "engine thread is dead" in err["message"]
        status, body = http("GET", url + "/health")[:2]
        assert status == 503 and b"engine thread is dead" in body
    finally:
        srv.stop()


def test_a_stuck_engine_loop_is_named_while_its_io_thread_beats():
    """A real Worker (its I/O thread, real ZeroMQ heartbeats to a frontend mailbox) whose
    engine loop hangs in tick(): the beats go on, carrying how long the loop has not turned;
    the frontend's Liveness calls it stalled, then names it dead past engine_stall_s."""
    import threading

    import mmhpc.messages  # noqa: F401  (registers the messages)
    from mmhpc.messages.common import Heartbeat
    from mmhpc.roles.liveness import Liveness
    from mmhpc.roles.worker import Worker
    from mmhpc.transport.zmq_io import Mailbox
    cfg = Config.from_dict({"timeouts": {"heartbeat_s": 0.2, "dead_rank_s": 1.0,
                                         "engine_stall_s": 1.5}})
    front, mb = Mailbox(0), Mailbox(1)
    front.set_peers({1: mb.address})
    mb.set_peers({0: front.address})
    ctx = SimpleNamespace(rank=1, config=cfg, mailbox=mb, role="decode",
                          layout=SimpleNamespace(frontend_rank=0),
                          info=SimpleNamespace(instance=0))
    hang, release = threading.Event(), threading.Event()

    class Hangs(Worker):
        def handle(self, src, msg) -> None:
            pass

        def tick(self) -> None:
            if hang.is_set():
                release.wait(10)            # a step that never returns

    w = Hangs(ctx)
    t = threading.Thread(target=w.run)
    t.start()
    dead: list[str] = []
    lv = Liveness(cfg.timeouts, {1: "decode"}, [1], lambda r, why: dead.append(why))
    lv.last_seen = {1: time.monotonic()}

    def listen(seconds: float) -> list[str]:
        stalled, end = [], time.monotonic() + seconds
        while time.monotonic() < end and not dead:
            for src, msg in front.recv_all(0.05):
                if isinstance(msg, Heartbeat):
                    lv.heard(src)
                    lv.beat(src, msg.stats)
            stalled += lv.stalled()
            lv.check(time.monotonic())
        return stalled
    try:
        assert not listen(1.0) and not dead              # turning: healthy
        hang.set()
        stalled = listen(4.0)
        assert any("engine loop stalled" in s for s in stalled), stalled
        assert len(dead) == 1 and dead[0].startswith(
            "rank 1 (decode) is dead: its engine loop made no progress for "), dead
        assert lv.silent_s(1) < 1.0                      # while its I/O thread still beats
    finally:
        w.stopping.set()
        release.set()
        t.join(10)
        front.close()
        mb.close()


def test_image_budget_over_http(tiny_llava, rng_image):
    """media.max_request_image_mb over real HTTP: a request whose images decode past it gets
    413 with an OpenAI error body; a small one beside it is served."""
    import base64
    import io

    from imgserver import http
    from mmhpc.server.app import ServerThread
    cfg = Config.from_dict({"model": {"path": str(tiny_llava), "max_model_len": 256},
                            "cache": {"num_blocks": 64},
                            "server": {"host": "127.0.0.1", "port": 0},
                            "media": {"max_request_image_mb": 0.5,
                                      "max_inflight_image_mb": 1.0}})

    def body(w: int, h: int) -> dict:
        buf = io.BytesIO()
        rng_image(3, w, h).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"model": tiny_llava.name, "max_tokens": 2, "messages": [{"role": "user",
                "content": [{"type": "text", "text": "hi"},
                            {"type": "image_url", "image_url": {"url": url}}]}]}
    srv = ServerThread(cfg)
    url = srv.start()
    try:
        status, raw = http("POST", url + "/v1/chat/completions", body(512, 512))[:2]  # 768 KiB
        err = json.loads(raw)["error"]
        assert status == 413 and err["code"] == "request_too_large", raw
        assert "max_request_image_mb" in err["message"]
        status, raw = http("POST", url + "/v1/chat/completions", body(64, 64))[:2]
        assert status == 200, raw
        assert srv.frontend.images.held == 0
    finally:
        srv.stop()
