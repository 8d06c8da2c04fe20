"""Hostile inputs, as a table: each gets a 4xx with an OpenAI error body naming the problem,
and the next good request still succeeds. One real server (tiny LLaVA) for the module, with
private URLs REFUSED; only the test image server's exact (127.0.0.1, port) is trusted, so SSRF
rows aim at other loopback/private targets (the frontend itself, metadata, ...)."""
from __future__ import annotations

import base64
import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
from PIL import Image

from conftest import CodeRunningPickle
from imgserver import ImageServer, http
from mmhpc.config import Config
from mmhpc.server.app import ServerThread
from mmhpc.server.media import text_hidden_size


@dataclass
class Case:
    name: str
    body: Any                              # dict, bytes, or f(env) -> dict | bytes
    status: int = 400
    code: Optional[str] = None
    path: str = "/v1/chat/completions"
    method: str = "POST"


def img_msg(url: str, text: str = "Describe.") -> Callable:
    return lambda env: {"messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url.format(**env)}}]}],
        "max_tokens": 2}


def msg(**kw) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def png(w=8, h=8, mode="RGB", fmt="PNG") -> bytes:
    b = io.BytesIO()
    Image.new(mode, (w, h)).save(b, fmt)
    return b.getvalue()


def noise_png(w=64, h=64) -> bytes:
    b = io.BytesIO()
    Image.frombytes("RGB", (w, h), os.urandom(w * h * 3)).save(b, "PNG")
    return b.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Chat requests with one image URL ({port}, {img}, {root} filled from env): (name, url, code).
IMAGE_ROWS = [
    # --- SSRF (the frontend's own port, private nets, metadata, IPv6/mapped/decimal forms)
    ("ssrf_loopback_self", "http://127.0.0.1:{port}/v1/models", "url_refused"),
    ("ssrf_localhost_name", "http://localhost:{port}/health", "url_refused"),
    ("ssrf_10_net", "http://10.0.0.1/a.png", "url_refused"),
    ("ssrf_192_168", "http://192.168.0.1/a.png", "url_refused"),
    ("ssrf_metadata", "http://169.254.169.254/latest/meta-data/", "url_refused"),
    ("ssrf_ipv6_loopback", "http://[::1]:{port}/health", "url_refused"),
    ("ssrf_ipv4_mapped_ipv6", "http://[::ffff:127.0.0.1]:{port}/health", "url_refused"),
    ("ssrf_ipv4_mapped_metadata", "http://[::ffff:a9fe:a9fe]/", "url_refused"),
    ("ssrf_decimal_ip", "http://2130706433:{port}/health", "url_refused"),
    ("ssrf_hex_ip", "http://0x7f000001:{port}/health", "url_refused"),
    ("ssrf_unspecified", "http://0.0.0.0:{port}/health", "url_refused"),
    ("redirect_to_metadata", "{img}/to-meta", "url_refused"),
    ("redirect_to_self", "{img}/to-self", "url_refused"),
    ("redirect_loop", "{img}/to-loop", "media_fetch_failed"),
    ("scheme_ftp", "ftp://example.com/a.png", "unsupported_url_scheme"),
    ("scheme_gopher", "gopher://127.0.0.1:70/_x", "unsupported_url_scheme"),
    # --- local files
    ("path_traversal_file_url", "file://{root}/../secret.png", "local_file_refused"),
    ("path_traversal_relative", "../secret.png", "local_file_refused"),
    ("symlink_escape", "{root}/link.png", "local_file_refused"),
    ("etc_passwd", "/etc/passwd", "local_file_refused"),
    ("oversize_file", "{root}/big.png", "media_too_large"),
    # --- image bytes
    ("oversize_image_http", "{img}/big", "media_too_large"),
    ("oversize_image_http_no_length", "{img}/big-nolen", "media_too_large"),
    ("pixel_bomb", "data:image/png;base64," + b64(png(3000, 3000, "1")), "image_too_large"),
    ("truncated_base64", "data:image/png;base64," + b64(png())[:-5], "invalid_media"),
    ("truncated_image", "data:image/png;base64," + b64(noise_png()[:6000]), "invalid_image"),
    ("bad_mime", "data:text/html;base64," + b64(b"<script>x</script>"), "unsupported_media_type"),
    ("svg_mime", "data:image/svg+xml;base64," + b64(b"<svg/>"), "unsupported_media_type"),
    ("non_image_bytes_http", "{img}/notimage", "invalid_image"),
    ("bmp_disguised_as_png", "data:image/png;base64," + b64(png(fmt="BMP")), "invalid_image"),
    ("http_404", "{img}/missing.png", "media_fetch_failed"),
    ("fetch_timeout", "{img}/slow", "media_fetch_timeout"),
    # --- embeddings files
    ("embeddings_wrong_shape", "{root}/wrong.pt", "invalid_embeddings"),
    ("embeddings_wrong_dtype", "{root}/int.pt", "invalid_embeddings"),
    ("embeddings_pickle_payload", "{root}/evil.pt", "invalid_embeddings"),
    ("embeddings_oversize", "{root}/huge.pt", "media_too_large"),
    ("embeddings_garbage_safetensors", "{root}/junk.safetensors", "invalid_embeddings"),
]

CASES = [
    *(Case(name, img_msg(url), code=code) for name, url, code in IMAGE_ROWS),
    # --- the request itself
    Case("unknown_model", msg(model="gpt-17"), status=404, code="model_not_found"),
    Case("bad_json", b'{"messages": [', code="invalid_json"),
    Case("json_not_object", b"[1, 2]", code="invalid_json"),
    Case("missing_messages", {"max_tokens": 2}, code="missing_required_parameter"),
    Case("empty_messages", {"messages": []}),
    Case("messages_not_list", {"messages": "hi"}),
    Case("bad_role", {"messages": [{"role": "root", "content": "hi"}]}),
    Case("negative_max_tokens", msg(max_tokens=-1)),
    Case("max_tokens_string", msg(max_tokens="10")),
    Case("temperature_negative", msg(temperature=-0.5)),
    Case("top_p_zero", msg(top_p=0)),
    Case("n_too_large", msg(n=100)),
    Case("stop_not_strings", msg(stop=[1, 2])),
    Case("top_logprobs_too_many", msg(logprobs=True, top_logprobs=50)),
    Case("frequency_penalty_too_large", msg(frequency_penalty=3)),
    Case("presence_penalty_string", msg(presence_penalty="high")),
    Case("repetition_penalty_zero", msg(repetition_penalty=0)),
    Case("logit_bias_not_object", msg(logit_bias=[1, 2])),
    Case("logit_bias_key_not_id", msg(logit_bias={"hello": 5})),
    Case("logit_bias_out_of_vocab", msg(logit_bias={str(10**9): 5})),
    Case("logit_bias_too_large", msg(logit_bias={"5": 1000})),
    Case("min_p_above_1", msg(min_p=1.5)),
    Case("tools", msg(tools=[{"type": "function", "function": {"name": "f"}}]),
         code="unsupported_parameter"),
    Case("tool_choice_required", msg(tool_choice="required"), code="unsupported_parameter"),
    Case("json_mode", msg(response_format={"type": "json_object"}), code="unsupported_parameter"),
    Case("audio_out", msg(modalities=["text", "audio"]), code="unsupported_parameter"),
    Case("completion_suffix", {"prompt": "hi", "suffix": "end", "max_tokens": 2},
         path="/v1/completions", code="unsupported_parameter"),
    Case("completion_best_of", {"prompt": "hi", "best_of": 3, "max_tokens": 2},
         path="/v1/completions", code="unsupported_parameter"),
    Case("stop_token_ids_not_ints", msg(stop_token_ids=["a"])),
    Case("stop_token_ids_out_of_vocab", msg(stop_token_ids=[10**9])),
    Case("too_many_images", lambda env: {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "{img}/a.png".format(**env)}}] * 5}]},
        code="too_many_images"),
    Case("image_url_without_url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {}}]}]}),
    Case("placeholder_in_chat_text", msg(messages=[{"role": "user", "content": "<image> hi"}]),
         code="image_placeholder_in_text"),
    Case("placeholder_mismatch_completion", {"prompt": "<image> what is it", "max_tokens": 2},
         path="/v1/completions", code="invalid_prompt"),
    Case("unsupported_content_type", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
        code="unsupported_content_type"),
    Case("prompt_longer_than_context", msg(messages=[{"role": "user", "content": "red " * 2000}]),
         code="context_length_exceeded"),
    Case("max_tokens_past_context", msg(max_tokens=100000), code="context_length_exceeded"),
    Case("completion_token_out_of_vocab", {"prompt": [1, 2, 10**9], "max_tokens": 2},
         path="/v1/completions"),
    Case("completion_missing_prompt", {"max_tokens": 2}, path="/v1/completions",
         code="missing_required_parameter"),
    Case("unknown_route", {}, path="/v1/nope", status=404, code="not_found"),
    Case("wrong_method", None, path="/v1/chat/completions", method="GET", status=405,
         code="method_not_allowed"),
    Case("body_too_large", lambda env: b'{"messages": "' + b"x" * (9 << 20) + b'"}', status=413,
         code="request_too_large"),
]


@pytest.fixture(scope="module")
def env(tiny_llava, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    root = tmp / "allowed"
    root.mkdir()
    (tmp / "secret.png").write_bytes(png())
    os.symlink(tmp / "secret.png", root / "link.png")
    (root / "big.png").write_bytes(b"\x89PNG" + os.urandom(600_000))
    hidden = text_hidden_size(tiny_llava)
    torch.save(torch.randn(4, hidden + 1), root / "wrong.pt")
    torch.save(torch.ones(4, hidden, dtype=torch.int64), root / "int.pt")
    marker = tmp / "pwned"
    torch.save({"mm_embeddings": torch.randn(4, hidden), "x": CodeRunningPickle(str(marker))}, root / "evil.pt")
    (root / "huge.pt").write_bytes(os.urandom(600_000))
    (root / "junk.safetensors").write_bytes(b"\xff" * 64)
    img = ImageServer().start()
    cfg = Config.from_dict({
        "model": {"path": str(tiny_llava), "max_model_len": 512},
        "cache": {"num_blocks": 128},
        "server": {"host": "127.0.0.1", "port": 0},
        "media": {"allow_private_urls": False, "allowed_local_path": str(root),
                  "max_image_mb": 0.5, "max_file_size_mb": 0.5, "max_image_pixels": 1_000_000,
                  "max_images_per_request": 4, "fetch_timeout_s": 1.0}})
    st = ServerThread(cfg)
    url = st.start()
    st.frontend.media.trusted.add(("127.0.0.1", img.port))
    port = int(url.rsplit(":", 1)[1])
    img.add("/a.png", png(), content_type="image/png")
    img.add("/big", os.urandom(700_000))
    img.add("/big-nolen", os.urandom(700_000), send_length=False)
    img.add("/notimage", b"<html>hello</html>", content_type="image/png")
    img.add("/slow", png(), delay_s=3.0)
    img.add("/to-meta", status=302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
    img.add("/to-self", status=302, headers={"Location": f"http://127.0.0.1:{port}/v1/models"})
    img.add("/to-loop", status=302, headers={"Location": "/to-loop"})
    yield {"url": url, "port": port, "root": str(root), "img": img.url(""), "st": st,
           "marker": marker, "model": tiny_llava.name}
    st.stop()
    img.stop()


def send(env, case: Case) -> tuple[int, bytes]:
    body = case.body(env) if callable(case.body) else case.body
    return http(case.method, env["url"] + case.path, body, timeout=30)


def good(env) -> dict:
    status, raw = http("POST", env["url"] + "/v1/chat/completions", img_msg("{img}/a.png")(env))
    assert status == 200, raw
    return json.loads(raw)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile(env, case):
    status, raw = send(env, case)
    assert status == case.status, raw[:300]
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if case.code:
        assert err["code"] == case.code, err
    assert not env["marker"].exists()
    assert good(env)["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("extra", [
    {"tools": [], "tool_choice": "none"}, {"tool_choice": "auto"},
    {"response_format": {"type": "text"}}, {"modalities": ["text"]}, {"functions": []},
    {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}},
    {"tools": None, "tool_choice": None, "response_format": None, "audio": None,
     "modalities": None, "logit_bias": None, "stop_token_ids": None}])
def test_harmless_values_of_unsupported_fields_are_accepted(extra):
    """What SDKs send by default (no tools, text output) is not refused."""
    from mmhpc.server import protocol as P
    req = P.parse_chat(msg(**extra), "m", 4, 1000)
    assert req.messages and req.sampling.max_tokens == 2


def test_enough_cases():
    assert len(CASES) >= 25


def test_hostile_burst_does_not_disturb_a_good_stream(env):
    """All rows at once, while a long greedy stream runs: its text equals a quiet rerun."""
    body = {"messages": [{"role": "user", "content": "Describe a red circle."}], "max_tokens": 48,
            "temperature": 0, "ignore_eos": True}
    quiet = json.loads(http("POST", env["url"] + "/v1/chat/completions", body)[1])
    result = {}

    def stream():
        result["r"] = http("POST", env["url"] + "/v1/chat/completions", {**body, "stream": True})
    t = threading.Thread(target=stream)
    t.start()
    cases = [c for c in CASES if c.name not in ("body_too_large", "fetch_timeout")]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda c: (c, send(env, c)[0]), cases))
    t.join(60)
    assert all(s == c.status for c, s in statuses), [(c.name, s) for c, s in statuses
                                                      if s != c.status]
    events = [ln[6:] for ln in result["r"][1].decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                   for e in events[:-1] if json.loads(e)["choices"])
    assert text == quiet["choices"][0]["message"]["content"]
    assert env["st"].client.healthy()
