"""``polyadapt serve --ray``: the server as a Ray Serve application on a local Ray instance with two CPU replicas,
talked to with the official ``openai`` client through Ray's HTTP proxy on loopback. Requests for one adapter stay on
the replica that loaded it (Ray Serve's model multiplexing keyed by the request's ``model``), answers equal the
single-machine server's, and errors keep OpenAI's shape."""

from __future__ import annotations

import json
import time

import pytest

from tests.serve.conftest import KEYS, TEXT_ADAPTERS, serve_config, serve_process

pytest.importorskip("ray.serve")

from polyadapt.serve.ray_serve import REPLICA_HEADER, adapters_named_by, model_id_of  # noqa: E402


def test_the_model_id_is_read_from_json_and_from_forms():
    assert model_id_of("application/json", json.dumps({"model": "a0", "messages": []}).encode()) == "a0"
    assert model_id_of("application/json", b"not json") == ""
    assert model_id_of("application/json", b'{"model": 3}') == ""
    assert model_id_of("application/x-www-form-urlencoded", b"model=calls&language=en") == "calls"
    boundary = "XyZ"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\nmodel=fake\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\ncalls\r\n--{boundary}--\r\n'
    ).encode()
    assert model_id_of(f"multipart/form-data; boundary={boundary}", body) == "calls"
    assert model_id_of("", b"") == ""


def test_a_route_names_its_adapters(tiny_world):
    from polyadapt.serve.config import validate_serve_config

    config = validate_serve_config(serve_config(tiny_world))
    assert adapters_named_by(config, "ab") == ["a0", "a1"]
    assert adapters_named_by(config, "a2") == ["a2"]
    assert adapters_named_by(config, "tiny") == []


@pytest.fixture(scope="module")
def ray_server(tiny_world, tmp_path_factory):
    """``polyadapt serve CONFIG --ray`` in a subprocess, as a user runs it: Ray stays out of the test process (a
    Ray driver shut down inside pytest ends the process at the next touch of its handles). SIGINT stops it."""
    import yaml

    from polyadapt.serve.server import free_port

    raw = serve_config(tiny_world)
    raw["bases"] = {name: raw["bases"][name] for name in ("tiny", "whisper")}
    raw["adapters"] = {name: raw["adapters"][name] for name in (*TEXT_ADAPTERS, "calls")}
    raw["tenants"]["harbor"]["models"] = [*TEXT_ADAPTERS, "ab", "tiny", "calls", "whisper"]
    root = tmp_path_factory.mktemp("ray-serve")
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    port = free_port()
    arguments = [str(path), "--ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--port", str(port),
                 "--log-level", "warning"]  # fmt: skip
    with serve_process(arguments, root / "serve.log", env={"OMP_NUM_THREADS": "1"}, timeout=300) as process:
        yield f"http://127.0.0.1:{port}"
    assert process.returncode == 0, (root / "serve.log").read_text()


def client(url: str, key: str = "HARBOR_KEY"):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS.get(key, key), max_retries=0, timeout=120)


def ask(url: str, model: str) -> tuple[str, str, str]:
    raw = client(url).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "what is the fee"}], max_tokens=4, temperature=0
    )
    answer = raw.parse()
    return raw.headers[REPLICA_HEADER], raw.headers["x-polyadapt-adapter"], answer.choices[0].message.content


def test_requests_for_an_adapter_stay_on_the_replica_that_loaded_it(ray_server):
    first = {name: ask(ray_server, name)[0] for name in ("a0", "a1")}
    # replicas report the model ids they hold every 0.1 s and the proxy's router learns them from Ray's controller;
    # on a loaded machine that takes a moment, and only then do requests follow the model id
    time.sleep(3.0)
    seen: dict[str, set[str]] = {"a0": set(), "a1": set()}
    for _ in range(4):
        for name in ("a0", "a1"):
            replica, adapter, _ = ask(ray_server, name)
            assert adapter.startswith(name)
            seen[name].add(replica)
    assert seen == {"a0": {first["a0"]}, "a1": {first["a1"]}}


def test_answers_equal_the_single_machine_server(ray_server, server):
    direct = server.client().chat.completions.create(
        model="a2", messages=[{"role": "user", "content": "what is the fee"}], max_tokens=4, temperature=0
    )
    _, adapter, text = ask(ray_server, "a2")
    assert text == direct.choices[0].message.content
    assert adapter == "a2@" + adapter.split("@", 1)[1]


def test_streaming_passes_through_the_gateway(ray_server):
    chunks = list(client(ray_server).chat.completions.create(
        model="a3", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0, stream=True
    ))  # fmt: skip
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (
        streamed
        == client(ray_server)
        .chat.completions.create(
            model="a3", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
        )
        .choices[0]
        .message.content
    )


def test_an_upload_is_routed_by_its_form_field(ray_server, server, tmp_path):
    from tests.serve.conftest import copy_clip

    clip = copy_clip(tmp_path)
    expected = server.client().audio.transcriptions.create(model="calls", file=clip.open("rb")).text
    raw = client(ray_server).audio.transcriptions.with_raw_response.create(model="calls", file=clip.open("rb"))
    assert raw.parse().text == expected and raw.headers["x-polyadapt-adapter"].startswith("calls@run:")
    again = client(ray_server).audio.transcriptions.with_raw_response.create(model="calls", file=clip.open("rb"))
    assert again.headers[REPLICA_HEADER] == raw.headers[REPLICA_HEADER]


def test_errors_keep_openais_shape_under_ray(ray_server):
    import urllib.error
    import urllib.request

    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        client(ray_server).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(ray_server, "wrong-key").chat.completions.create(model="a0", messages=[{"role": "user", "content": "x"}])
    request = urllib.request.Request(f"{ray_server}/admin/adapters",
                                     headers={"Authorization": f"Bearer {KEYS['SERVE_ADMIN_KEY']}"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["error"]["code"] == "unsupported_under_ray"
    models = client(ray_server).models.list()
    assert {"a0", "a1", "ab", "tiny"} <= {m.id for m in models.data}
