"""The served model id (issue 24): `model.name` sets it; the `model.path` string (vLLM's and
trtllm-serve's default id) names the same model. Real engine, real HTTP, the openai client."""
from __future__ import annotations

import openai
import pytest

from mmhpc.config import Config
from mmhpc.server.app import ServerThread, model_aliases, served_model_name


def test_default_id_is_the_directory_name_and_the_path_is_an_alias():
    c = Config.from_dict({"model": {"path": "/models/llava-1.5-7b-hf/"}})
    assert served_model_name(c) == "llava-1.5-7b-hf"
    assert model_aliases(c) == {"/models/llava-1.5-7b-hf/", "/models/llava-1.5-7b-hf"}
    named = Config.from_dict({"model": {"path": "/models/X", "name": "x-chat"}})
    assert served_model_name(named) == "x-chat"
    assert model_aliases(named) == {"/models/X", "/models/X/"}


@pytest.fixture(scope="module")
def server(tiny_llava):
    st = ServerThread(Config.from_dict({"model": {"path": str(tiny_llava), "name": "mine"},
                                        "cache": {"num_blocks": 64},
                                        "server": {"host": "127.0.0.1", "port": 0}}))
    url = st.start()
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    st.stop()


def test_name_and_path_both_answer(server, tiny_llava):
    assert [m.id for m in server.models.list().data] == ["mine"]
    texts = []
    for model in ("mine", str(tiny_llava), str(tiny_llava) + "/"):
        r = server.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert r.model == "mine"
        texts.append(r.choices[0].message.content)
        assert server.completions.create(model=model, prompt="Hi", max_tokens=2).model == "mine"
    assert len(set(texts)) == 1
    assert server.models.retrieve("mine").id == "mine"
    with pytest.raises(openai.NotFoundError):      # the directory's name is not the id now
        server.chat.completions.create(model=tiny_llava.name, max_tokens=2,
                                       messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError):    # not a string: a 400, never a 500
        server.chat.completions.create(model=["mine"], max_tokens=2,  # type: ignore[arg-type]
                                       messages=[{"role": "user", "content": "Hi"}])
