"""``retrieve:`` on an adapter or a route: requests get the grounded prompt, responses carry the sources in the text
and as ``polyadapt_sources``, and an index given as NAME@ALIAS follows its alias without a restart. Its own small
server: a tiny LLaMA, one run, two versions of a tiny index in a registry."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.serve.conftest import KEYS
from tests.text.builders import VOCAB, build_model, build_tokenizer, chat_records, make_config, write_jsonl

pytestmark = pytest.mark.timeout(600)

V1 = {
    "savings.md": "# Savings\n\n## TideSaver\n\nTideSaver pays 3.10% APY with six free withdrawals a month.\n",
    "cards.md": "# Cards\n\n## Limits\n\nThe Anchor Card daily ATM limit is $800.\n",
}
V2 = {**V1, "savings.md": "# Savings\n\n## TideSaver\n\nTideSaver pays 3.40% APY with six free withdrawals a month.\n"}
QUESTION = "What APY does TideSaver pay?"


@pytest.fixture(scope="module")
def grounded_server(tmp_path_factory, serve_env):
    import polyadapt
    import polyadapt.registry
    from polyadapt.retrieval import build_index
    from polyadapt.serve.config import read_keys, validate_serve_config
    from polyadapt.serve.engine import Engine
    from polyadapt.serve.server import ServerThread

    root = tmp_path_factory.mktemp("grounded")
    base = root / "llama"
    build_tokenizer(base)
    build_model("llama", base, VOCAB)
    data = root / "data"
    write_jsonl(data / "train.jsonl", chat_records(8))
    write_jsonl(data / "validation.jsonl", chat_records(2, with_facts=True, offset=60))
    run = polyadapt.adapt(make_config(
        base, data, root / "run", eval={"before": False},
        train={"max_steps": 2, "lr": 0.05, "batch_size": 4, "eval_every": None, "early_stopping_patience": None},
        text={"max_length": 64, "max_new_tokens": 6, "generate_eval": False},
    ))  # fmt: skip
    indexes = {}
    for name, docs in (("v1", V1), ("v2", V2)):
        folder = root / f"docs-{name}"
        folder.mkdir()
        for file, text in docs.items():
            (folder / file).write_text(text)
        build_index(folder, root / f"index-{name}", chunk_tokens=64, overlap=8).close()
        indexes[name] = root / f"index-{name}"
    registry = root / "registry"
    reg = polyadapt.registry.open(registry)
    try:
        assert reg.push(indexes["v1"], "policies").version.version == 1
        assert reg.push(indexes["v2"], "policies").version.version == 2
        reg.alias("policies@v1", "production")
    finally:
        reg.close()
    raw = {
        "registry": str(registry), "registry_poll_seconds": 0.25,
        "bases": {"tiny": {"modality": "text", "base": str(base)}},
        "adapters": {
            "grounded": {"base": "tiny", "from": str(run), "retrieve": "policies@production"},
            "plain": {"base": "tiny", "from": str(run)},
        },
        "routes": {"cited": {"split": {"plain": 1.0}, "retrieve": str(indexes["v2"])}},
        "tenants": {"harbor": {"key_env": "HARBOR_KEY", "models": ["grounded", "plain", "cited", "tiny"]}},
        "limits": {"max_tokens": 16},
    }  # fmt: skip
    config = validate_serve_config(raw)
    engine = Engine.start(config, read_keys(config))
    thread = ServerThread(engine, lifetime=600).start()
    try:
        yield {"url": thread.url, "engine": engine, "registry": registry, "indexes": indexes, "raw": raw,
               "base": base}  # fmt: skip
    finally:
        thread.stop()


def _post(server, path: str, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {KEYS['HARBOR_KEY']}"}
    return httpx.post(f"{server['url']}{path}", json=body, headers=headers, timeout=120)


def _chat(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 0}
    return _post(server, "/v1/chat/completions", {**body, **extra})


def test_a_chat_to_an_adapter_with_retrieve_is_grounded_and_cites_its_sources(grounded_server):
    reply = _chat(grounded_server, "grounded")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["polyadapt_index"] == "policies@v1" == reply.headers["x-polyadapt-index"]
    sources = body["polyadapt_sources"]
    assert [s["index"] for s in sources] == [1, 2]
    assert sources[0]["citation"] == "savings.md#tidesaver" and sources[0]["source"] == "savings.md"
    assert all(isinstance(s["score"], float) for s in sources)
    content = body["choices"][0]["message"]["content"]
    listed = [f"[{s['index']}] {s['citation']}" + ("  (cited)" if s["cited"] else "") for s in sources]
    assert content.endswith("\n\n" + "\n".join(["Sources:", *listed]))
    plain_reply = _chat(grounded_server, "plain")
    assert "x-polyadapt-index" not in plain_reply.headers
    plain = plain_reply.json()
    assert "polyadapt_sources" not in plain and "Sources:" not in plain["choices"][0]["message"]["content"]
    # the grounded prompt: the excerpts numbered, through the chat template, longer than the question alone
    assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20


def test_the_grounded_prompt_is_what_the_backend_asks_the_model(grounded_server):
    from transformers import AutoTokenizer

    from polyadapt.serve.backend import GenerationOptions

    engine = grounded_server["engine"]
    target = engine.resolve("grounded", "harbor", "chat")
    found = engine.index_for(target).search(QUESTION)
    spec = target.worker.backend.chat_spec(
        [("user", QUESTION)], target.adapter, GenerationOptions(max_tokens=6, excerpts=tuple(found.hits))
    )
    text = AutoTokenizer.from_pretrained(str(grounded_server["base"])).decode(spec.prompt_ids)
    assert "<|im_start|>user\nAnswer the question from the numbered excerpts below." in text
    assert "[1] savings.md#tidesaver: TideSaver pays 3.10% APY" in text
    assert text.endswith(f"Question: {QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert [e.citation for e in spec.excerpts] == ["savings.md#tidesaver", "cards.md#limits"]


def test_completions_and_a_route_with_retrieve(grounded_server):
    body = {"model": "cited", "prompt": QUESTION, "max_tokens": 6, "temperature": 0}
    reply = _post(grounded_server, "/v1/completions", body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["polyadapt_index"] == str(grounded_server["indexes"]["v2"])
    assert data["choices"][0]["polyadapt_sources"] == data["polyadapt_sources"]
    assert "\n\nSources:\n[1] savings.md#tidesaver" in data["choices"][0]["text"]


def test_a_grounded_stream_ends_with_its_sources(grounded_server):
    whole = _chat(grounded_server, "grounded").json()
    headers = {"authorization": f"Bearer {KEYS['HARBOR_KEY']}"}
    body = {"model": "grounded", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6,
            "temperature": 0, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{grounded_server['url']}/v1/chat/completions", json=body, headers=headers,
                      timeout=120) as response:  # fmt: skip
        assert response.headers["x-polyadapt-index"] == whole["polyadapt_index"]
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-1]["polyadapt_sources"] == whole["polyadapt_sources"]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_index_follows_its_registry_alias(grounded_server):
    import polyadapt.registry

    assert _chat(grounded_server, "grounded").json()["polyadapt_index"] == "policies@v1"
    reg = polyadapt.registry.open(grounded_server["registry"], create=False)
    try:
        reg.alias("policies@v2", "production")
    finally:
        reg.close()
    start = time.monotonic()
    while time.monotonic() - start < 30:
        body = _chat(grounded_server, "grounded").json()
        if body["polyadapt_index"] == "policies@v2":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the server still grounds in policies@v1")
    engine = grounded_server["engine"]
    hits = engine.index_for(engine.resolve("grounded", "harbor", "chat")).search(QUESTION).hits
    assert "3.40% APY" in hits[0].text


def test_retrieve_is_checked_before_anything_loads(grounded_server, tmp_path):
    from polyadapt.errors import ConfigError
    from polyadapt.serve.config import read_keys, validate_serve_config
    from polyadapt.serve.engine import Engine

    raw = dict(grounded_server["raw"])
    with pytest.raises(ConfigError, match=r"adapters\.grounded\.retrieve: 'policies@production' is a registry"):
        validate_serve_config({**raw, "registry": None})
    missing = {**raw, "adapters": {**raw["adapters"], "plain": {"base": "tiny", "from": raw["adapters"]["plain"]["from"],
                                                                 "retrieve": str(tmp_path / "nowhere")}}}  # fmt: skip
    config = validate_serve_config(missing)
    with pytest.raises(ConfigError, match=r"adapters\.plain\.retrieve: .*nowhere does not exist"):
        Engine.start(config, read_keys(config))
    with pytest.raises(ConfigError, match=r"routes\.cited\.retrieve_it: unknown key"):
        validate_serve_config({**raw, "routes": {"cited": {"split": {"plain": 1.0}, "retrieve_it": "x"}}})
