"""Speech and images through a real server and the official client: a transcription equals ``polyadapt infer`` on
the same file, in every response format, alone or batched with others; corrupt, empty and too long audio are refused;
generated images equal ``polyadapt infer`` pixel for pixel, with ``seed``, ``n``, ``size`` and ``lora_scale``."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner

openai = pytest.importorskip("openai")

from polyadapt.cli import cli  # noqa: E402
from tests.serve.conftest import copy_clip  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def infer_lines(*args: str) -> list[str]:
    result = CliRunner().invoke(cli, ["infer", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.splitlines() if line.strip()]


def clips(tmp_path, count: int = 4) -> list:
    from tests.speech.conftest import SAMPLES

    found = sorted((SAMPLES / "test").glob("*.wav"))[:count]
    return [copy_clip(tmp_path, f.name) if i == 0 else f for i, f in enumerate(found)]


def test_a_transcription_equals_polyadapt_infer_in_every_format(server, tmp_path):
    clip = copy_clip(tmp_path)
    expected = infer_lines(str(server.runs["calls"]), str(clip))[0].split("\t", 1)[1]
    client = server.client()
    raw = client.audio.transcriptions.with_raw_response.create(model="calls", file=clip.open("rb"))
    assert raw.parse().text == expected and raw.headers["x-polyadapt-adapter"].startswith("calls@run:")
    text = client.audio.transcriptions.create(model="calls", file=clip.open("rb"), response_format="text")
    assert text.strip() == expected
    verbose = client.audio.transcriptions.create(model="calls", file=clip.open("rb"), response_format="verbose_json")
    assert verbose.text == expected and abs(verbose.duration - 2.3686) < 0.01
    base = client.audio.transcriptions.with_raw_response.create(model="whisper", file=clip.open("rb"))
    assert base.headers["x-polyadapt-adapter"] == "whisper@base"


def test_concurrent_transcriptions_are_batched_and_equal_their_sequential_ones(server, tmp_path):
    files = clips(tmp_path)
    requests = [(model, f) for f in files for model in ("calls", "whisper")]
    client = server.client()

    def ask(request) -> str:
        model, path = request
        return server.client().audio.transcriptions.create(model=model, file=path.open("rb")).text

    sequential = [client.audio.transcriptions.create(model=m, file=f.open("rb")).text for m, f in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        assert list(pool.map(ask, requests)) == sequential
    for (model, path), text in zip(requests, sequential, strict=True):
        if model == "calls":
            assert infer_lines(str(server.runs["calls"]), str(path))[0].split("\t", 1)[1] == text


def test_bad_audio_is_400_and_long_audio_413(server, tmp_path):
    import soundfile

    client = server.client()
    for name, data in (("corrupt.wav", b"RIFF....WAVEfmt not really audio"), ("empty.wav", b"")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.audio.transcriptions.create(model="calls", file=(name, data))
        assert caught.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="calls", file=copy_clip(tmp_path).open("rb"), response_format="srt")
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="calls", file=copy_clip(tmp_path).open("rb"), language="de")
    assert "English-only" in caught.value.body["message"]
    long = tmp_path / "long.wav"
    soundfile.write(long, np.full(16_000 * 21, 0.01, dtype=np.float32), 16_000, subtype="PCM_16")
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.transcriptions.create(model="calls", file=long.open("rb"))
    assert caught.value.status_code == 413
    assert client.audio.transcriptions.create(model="calls", file=copy_clip(tmp_path).open("rb")).text is not None


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to the rounding of a few pixels: a batched pass may differ from a single one in the last float bits,
    which moves a rare pixel by one level when it is rounded to 8 bits."""
    gap = np.abs(a - b)
    return a.shape == b.shape and int(gap.max()) <= 2 and float((gap > 0).mean()) < 0.02


def pixels(data: bytes | str) -> np.ndarray:
    from PIL import Image

    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(int)


def test_generated_images_equal_polyadapt_infer(server, tmp_path):
    from PIL import Image

    prompt = "a gold circle on a navy background in harbor style"
    client = server.client()
    raw = client.images.with_raw_response.generate(model="brand", prompt=prompt, n=2, response_format="b64_json",
                                                   extra_body={"seed": 5})  # fmt: skip
    served = raw.parse()
    assert raw.headers["x-polyadapt-adapter"].startswith("brand@run:") and len(served.data) == 2
    lines = infer_lines(str(server.runs["brand"]), "--prompt", prompt, "--n", "2", "--seed", "5", "--out",
                        str(tmp_path / "out"))  # fmt: skip
    for line, item in zip(lines[-2:], served.data, strict=True):
        assert same_image(np.asarray(Image.open(line).convert("RGB")).astype(int), pixels(item.b64_json))
    faint = client.images.generate(model="brand", prompt=prompt, extra_body={"seed": 5, "lora_scale": 0.0})
    base = client.images.generate(model="sd", prompt=prompt, extra_body={"seed": 5})
    assert np.array_equal(pixels(faint.data[0].b64_json), pixels(base.data[0].b64_json))
    assert not same_image(pixels(base.data[0].b64_json), pixels(served.data[0].b64_json))
    bigger = client.images.generate(model="brand", prompt=prompt, size="24x32", extra_body={"seed": 1})
    assert pixels(bigger.data[0].b64_json).shape == (32, 24, 3)


def test_concurrent_image_requests_are_grouped_by_adapter_and_equal_their_sequential_ones(server):
    requests = [(model, seed) for seed in (1, 2, 3) for model in ("brand", "sd")]

    def ask(request) -> np.ndarray:
        model, seed = request
        answer = server.client().images.generate(model=model, prompt="a teal circle", extra_body={"seed": seed})
        return pixels(answer.data[0].b64_json)

    sequential = [ask(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(ask, requests))
    for request, got, expected in zip(requests, concurrent, sequential, strict=True):
        assert same_image(got, expected), (request, int(np.abs(got - expected).max()))
    assert not same_image(sequential[0], sequential[1]), "the adapter changes nothing: the test would see no mix-up"
