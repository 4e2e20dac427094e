"""The API around the models: /v1/models per tenant, every error in OpenAI's shape (and the server serving on after
each), routes, /health, /metrics and the admin endpoints."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from tests.serve.conftest import KEYS, TEXT_ADAPTERS  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def http(server, method: str, path: str, body: bytes | dict | None = None, key: str | None = "HARBOR_KEY",
         content_type: str = "application/json") -> tuple[int, dict, dict]:  # fmt: skip
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"{server.url}{path}", data=data, method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {KEYS.get(key, key)}")
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw, status, headers = response.read(), response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        raw, status, headers = error.read(), error.code, dict(error.headers)
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = {"text": raw.decode(errors="replace")}
    return status, parsed, headers


def still_serving(server) -> None:
    answer = server.client().completions.create(model="a0", prompt="hello", max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


def assert_openai_error(body: dict, status: int, code: str | None = None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], body
    assert error["type"] == "invalid_request_error", body
    if code is not None:
        assert error["code"] == code, body


def test_models_lists_only_the_tenants_models_with_parent_and_version(server):
    listed = {m.id: m.model_dump() for m in server.client().models.list().data}
    assert set(listed) == {*TEXT_ADAPTERS, "support", "ab", "tiny", "calls", "whisper", "brand", "sd"}
    assert listed["support"]["parent"] == "tiny" and listed["support"]["version"] == "support@v1"
    assert listed["calls"]["parent"] == "whisper" and listed["calls"]["modality"] == "speech"
    assert listed["tiny"]["parent"] is None and listed["ab"]["route"] == {"a0": 0.5, "a1": 0.5}
    assert listed["ab"]["parent"] == "tiny"
    assert [m.id for m in server.client("OTHER_KEY").models.list().data] == ["a1"]
    assert server.client().models.retrieve("brand").parent == "sd"
    with pytest.raises(openai.NotFoundError):
        server.client("OTHER_KEY").models.retrieve("a0")


def test_keys_are_required_and_other_tenants_models_look_missing(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client("wrong-key").completions.create(model="a0", prompt="x", max_tokens=2)
    assert caught.value.body["code"] == "invalid_api_key"
    for key in (None, KEYS["HARBOR_KEY"][:-1], KEYS["HARBOR_KEY"] + "x", KEYS["SERVE_ADMIN_KEY"]):
        status, body, headers = http(server, "GET", "/v1/models", key=key)
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert_openai_error(body, 401, "invalid_api_key")
    other = server.client("OTHER_KEY")
    with pytest.raises(openai.NotFoundError) as hidden:
        other.completions.create(model="a0", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        other.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert hidden.value.body["message"].replace("a0", "M") == missing.value.body["message"].replace(
        "no-such-model", "M"
    )
    assert hidden.value.body["code"] == "model_not_found"
    assert other.completions.create(model="a1", prompt="x", max_tokens=2, temperature=0).choices
    still_serving(server)


def test_bad_requests_are_400_in_openai_shape_and_the_server_serves_on(server):
    client = server.client()
    cases = [
        (b'{"model": "a0", "prompt": ', "invalid_json"),
        ({"model": "a0", "prompt": "x", "max_tokens": "five"}, "invalid_request"),
        ({"model": "a0", "prompt": 7}, "invalid_request"),
        ({"model": "a0"}, "invalid_request"),
        ({"model": "a0", "prompt": "x", "temperature": -1}, "invalid_request"),
    ]
    for body, code in cases:
        status, answer, _ = http(server, "POST", "/v1/completions", body)
        assert status == 400, (body, answer)
        assert_openai_error(answer, 400, code)
        still_serving(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="a0", prompt="the quick brown fox " * 200, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded" and "512" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="calls", messages=[{"role": "user", "content": "hi"}])
    assert "speech model" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="brand", prompt="x", response_format="url")
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="brand", prompt="x", size="17x16")
    status, answer, _ = http(server, "POST", "/v1/nothing-here", {"model": "a0"})
    assert status == 404 and "error" in answer
    still_serving(server)


def test_requests_past_the_limits_are_413(server):
    client = server.client()
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="a0", prompt="x", max_tokens=65)
    assert caught.value.status_code == 413 and caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="a0", prompt="x", max_tokens=2, n=9)
    assert caught.value.status_code == 413
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(model="brand", prompt="x", n=4)
    assert caught.value.status_code == 413 and caught.value.body["param"] == "n"
    status, answer, _ = http(server, "POST", "/v1/completions", {"model": "a0", "prompt": "x" * (2 * 2**20)})
    assert status == 413
    assert_openai_error(answer, 413, "request_too_large")
    still_serving(server)


def test_a_route_splits_sticky_per_user_and_says_what_served(server, vanilla_text):
    client = server.client()
    seen = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        targets = set()
        for _ in range(3):
            raw = client.completions.with_raw_response.create(model="ab", prompt="hello", max_tokens=6, temperature=0,
                                                              user=user)  # fmt: skip
            route, _, target = raw.headers["x-polyadapt-route"].partition("=")
            assert route == "ab" and raw.headers["x-polyadapt-adapter"].startswith(f"{target}@run:")
            assert raw.parse().choices[0].text == vanilla_text(server.runs[target], "hello", 6)
            targets.add(target)
        assert len(targets) == 1, f"{user} was not sticky"
        seen[user] = targets.pop()
    assert set(seen.values()) == {"a0", "a1"}
    status, body, _ = http(server, "GET", "/metrics", key=None)
    assert 'polyadapt_route_decisions_total{route="ab",target="a0"}' in body["text"]


def test_health_and_metrics(server):
    server.client().completions.create(model="a2", prompt="hi", max_tokens=3, temperature=0)
    status, health, _ = http(server, "GET", "/health", key=None)
    assert status == 200 and health["status"] == "ok" and set(health["bases"]) == {"tiny", "whisper", "sd"}
    status, body, headers = http(server, "GET", "/metrics", key=None)
    text = body["text"]
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for metric in (
        'polyadapt_requests_total{endpoint="/v1/completions",status="200"}',
        'polyadapt_errors_total{endpoint="/v1/completions"',
        'polyadapt_request_seconds_bucket{endpoint="/v1/completions"',
        'polyadapt_completion_tokens_total{adapter="a2@run:',
        'polyadapt_batch_rows_count{base="tiny"}',
        'polyadapt_loaded_adapters{base="tiny"}',
        'polyadapt_adapter_version{adapter="support"} 1.0',
    ):
        assert metric in text, metric


def test_admin_loads_adds_unloads_and_removes_adapters_at_runtime(server):
    for key in (None, "HARBOR_KEY"):
        status, body, _ = http(server, "GET", "/admin/adapters", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body, _ = http(server, "POST", "/admin/adapters/a3/load", key="SERVE_ADMIN_KEY")
    assert status == 200 and body["loaded"]
    state = {a["name"]: a for a in http(server, "GET", "/admin/adapters", key="SERVE_ADMIN_KEY")[1]["data"]}
    assert state["a3"]["loaded"] and state["support"]["followed"] and not state["a0"]["followed"]
    status, body, _ = http(server, "POST", "/admin/adapters/a3/unload", key="SERVE_ADMIN_KEY")
    assert status == 200 and body["unloaded"]
    state = {a["name"]: a for a in http(server, "GET", "/admin/adapters", key="SERVE_ADMIN_KEY")[1]["data"]}
    assert not state["a3"]["loaded"]
    # no request names a server path
    status, body, _ = http(server, "POST", "/admin/adapters", {"name": "x", "base": "tiny", "from": str(server.runs["a0"])},
                           key="SERVE_ADMIN_KEY")  # fmt: skip
    assert status == 400 and "server path" in body["error"]["message"]
    add = {"name": "support-two", "base": "tiny", "from": "support@v2", "tenants": ["other"]}
    status, body, _ = http(server, "POST", "/admin/adapters", add, key="SERVE_ADMIN_KEY")
    assert status == 200 and body["version"] == "support@v2" and not body["followed"]
    other = server.client("OTHER_KEY")
    raw = other.completions.with_raw_response.create(model="support-two", prompt="hi", max_tokens=4, temperature=0)
    assert raw.headers["x-polyadapt-adapter"] == "support@v2"
    assert {m.id for m in other.models.list().data} == {"a1", "support-two"}
    status, body, _ = http(server, "DELETE", "/admin/adapters/support-two", key="SERVE_ADMIN_KEY")
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model="support-two", prompt="hi", max_tokens=4)
    still_serving(server)
