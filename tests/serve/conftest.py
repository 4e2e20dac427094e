"""Fixtures of the server tests: tiny bases of all three modalities built from configs, tiny runs adapted from them in
a few steps, a registry in a temporary directory, and one real uvicorn server on 127.0.0.1 (a free port) that the
tests talk to with the official ``openai`` client. The server stops at the end of the session, and by itself after
``LIFETIME`` seconds whatever happens. Nothing is downloaded."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from tests.text.builders import VOCAB, build_model, build_tokenizer, chat_records, make_config, write_jsonl  # noqa: E402

KEYS = {"HARBOR_KEY": "harbor-secret-key", "OTHER_KEY": "other-secret-key", "SERVE_ADMIN_KEY": "admin-secret-key"}
#: the most seconds the shared server lives
LIFETIME = 900
#: the four text adapters the load test spreads over
TEXT_ADAPTERS = ("a0", "a1", "a2", "a3")
LIMITS = {
    "max_tokens": 64, "max_audio_seconds": 20, "max_images": 3, "max_batch": 16, "max_wait_ms": 20,
    "max_loaded_adapters": 3, "max_request_mb": 1,
}  # fmt: skip


@dataclass
class Served:
    """The running server and what the tests need to know about it."""

    url: str
    engine: Any
    root: Path
    runs: dict[str, Path]
    bases: dict[str, Path]
    registry: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, key: str = "HARBOR_KEY", **options: Any) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEYS.get(key, key), max_retries=0, timeout=120,
                             **options)  # fmt: skip


def _text_run(base: Path, root: Path, index: int) -> Path:
    data = root / f"text-data-{index}"
    write_jsonl(data / "train.jsonl", chat_records(8, offset=3 * index))
    write_jsonl(data / "validation.jsonl", chat_records(2, with_facts=True, offset=60))
    config = make_config(
        base, data, root / f"text-run-{index}",
        train={"max_steps": 3, "lr": 0.05, "batch_size": 4, "seed": index, "eval_every": None,
               "early_stopping_patience": None},
        eval={"before": False}, text={"max_length": 64, "max_new_tokens": 8, "generate_eval": False},
    )  # fmt: skip
    import polyadapt

    return polyadapt.adapt(config)


def _speech_run(base: Path, root: Path) -> Path:
    from tests.speech.conftest import write_dataset

    data = write_dataset(root / "speech-data", train=4, test=2)
    config = {
        "modality": "speech", "base": str(base), "data": {"path": str(data)}, "output": str(root / "speech-run"),
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "lr": 3e-3, "batch_size": 2, "scheduler": "constant", "precision": "fp32",
                  "eval_every": None, "early_stopping_patience": None},
        "eval": {"batch_size": 2, "before": False}, "speech": {"max_new_tokens": 8},
    }  # fmt: skip
    path = root / "speech.yaml"
    path.write_text(yaml.safe_dump(config))
    import polyadapt

    return polyadapt.adapt(path)


def _image_run(base: Path, root: Path) -> Path:
    from tests.image.conftest import RESOLUTION, write_dataset

    data = write_dataset(root / "image-data", train=4, test=2)
    config = {
        "modality": "image", "base": str(base), "data": {"path": str(data)}, "output": str(root / "image-run"),
        "peft": {"r": 4, "alpha": 4, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "precision": "fp32", "scheduler": "constant",
                  "eval_every": None, "early_stopping_patience": None},
        "eval": {"before": False},
        "image": {"resolution": RESOLUTION, "trigger": "in harbor style", "num_inference_steps": 2,
                  "validation_seeds": [0], "num_validation_prompts": 1},
    }  # fmt: skip
    path = root / "image.yaml"
    path.write_text(yaml.safe_dump(config))
    import polyadapt

    return polyadapt.adapt(path)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # one thread: a server's forward passes are many small operations, and on a shared machine oversubscribed OpenMP
    # threads wait for each other at every one of them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def serve_env(tmp_path_factory):
    """The API keys and a private registry cache, in the environment for the session."""
    saved = {k: os.environ.get(k) for k in (*KEYS, "POLYADAPT_CACHE")}
    os.environ.update(KEYS)
    os.environ["POLYADAPT_CACHE"] = str(tmp_path_factory.mktemp("polyadapt-cache"))
    yield KEYS
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, serve_env) -> dict[str, Any]:
    """Bases (a tiny LLaMA, Whisper and Stable Diffusion), runs adapted from them, and a registry holding two
    versions of ``support`` (text runs 0 and 1) with ``@production`` on v1."""
    from tests.image.conftest import save_tiny_pipeline
    from tests.speech.conftest import build_whisper

    root = tmp_path_factory.mktemp("serve")
    llama = root / "llama"
    build_tokenizer(llama)
    build_model("llama", llama, VOCAB)
    whisper = root / "whisper"
    build_whisper(whisper)
    sd = save_tiny_pipeline(root / "tiny-sd")
    runs = {name: _text_run(llama, root, i) for i, name in enumerate(TEXT_ADAPTERS)}
    runs["calls"] = _speech_run(whisper, root)
    runs["brand"] = _image_run(sd, root)
    import polyadapt.registry

    registry = root / "registry"
    reg = polyadapt.registry.open(registry)
    try:
        assert reg.push(runs["a0"], "support").version.version == 1
        assert reg.push(runs["a1"], "support").version.version == 2
        reg.alias("support@v1", "production")
    finally:
        reg.close()
    return {"root": root, "runs": runs, "bases": {"tiny": llama, "whisper": whisper, "sd": sd}, "registry": registry}


def serve_config(world: dict[str, Any], **changes: Any) -> dict[str, Any]:
    runs, bases = world["runs"], world["bases"]
    config: dict[str, Any] = {
        "registry": str(world["registry"]),
        "registry_poll_seconds": 0.25,
        "bases": {
            "tiny": {"modality": "text", "base": str(bases["tiny"])},
            "whisper": {"modality": "speech", "base": str(bases["whisper"]), "speech": {"max_new_tokens": 8}},
            "sd": {"modality": "image", "base": str(bases["sd"]), "image": {"num_inference_steps": 2}},
        },
        "adapters": {
            **{name: {"base": "tiny", "from": str(runs[name])} for name in TEXT_ADAPTERS},
            "support": {"base": "tiny", "from": "support@production"},
            "calls": {"base": "whisper", "from": str(runs["calls"])},
            "brand": {"base": "sd", "from": str(runs["brand"])},
        },
        "routes": {"ab": {"split": {"a0": 0.5, "a1": 0.5}, "sticky": "user"}},
        "tenants": {
            "harbor": {"key_env": "HARBOR_KEY",
                       "models": [*TEXT_ADAPTERS, "support", "ab", "tiny", "calls", "whisper", "brand", "sd"]},
            "other": {"key_env": "OTHER_KEY", "models": ["a1"]},
        },
        "admin_key_env": "SERVE_ADMIN_KEY",
        "limits": dict(LIMITS),
    }  # fmt: skip
    config.update(changes)
    return config


@pytest.fixture(scope="session")
def server(tiny_world) -> Served:
    from polyadapt.serve.config import read_keys, validate_serve_config
    from polyadapt.serve.engine import Engine
    from polyadapt.serve.server import ServerThread

    config = validate_serve_config(serve_config(tiny_world))
    engine = Engine.start(config, read_keys(config))
    thread = ServerThread(engine, lifetime=LIFETIME).start()
    try:
        yield Served(
            url=thread.url, engine=engine, root=tiny_world["root"], runs=tiny_world["runs"],
            bases=tiny_world["bases"], registry=tiny_world["registry"],
        )  # fmt: skip
    finally:
        thread.stop()


@pytest.fixture(scope="session")
def vanilla_text(tiny_world):
    """``answer(adapter_run | None, prompt, max_new_tokens)``: what vanilla transformers (+ PEFT) greedy ``generate``
    returns for ``tokenizer(prompt)``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_world["bases"]["tiny"]
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    models: dict[Any, Any] = {}

    def answer(run: Path | None, prompt: str, max_new_tokens: int) -> str:
        if run not in models:
            model = AutoModelForCausalLM.from_pretrained(str(base_dir))
            models[run] = (PeftModel.from_pretrained(model, str(run)) if run is not None else model).eval()
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = models[run].generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    return answer


def copy_clip(directory: Path, name: str = "clip.wav") -> Path:
    from tests.speech.conftest import SAMPLES

    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(SAMPLES / "test" / "test_000.wav", directory / name))


@contextlib.contextmanager
def serve_process(arguments: list[str], log: Path, env: dict[str, str] | None = None,
                  timeout: float = 180) -> Iterator[subprocess.Popen]:  # fmt: skip
    """``python -m polyadapt serve ARGUMENTS`` (which must include ``--port``) as a user runs it, output in ``log``:
    yields the process once ``/health`` answers 200, and stops it with SIGINT on leaving (killed after 60 s);
    the caller checks ``returncode``."""
    port = arguments[arguments.index("--port") + 1]
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "polyadapt", "serve", *arguments],
                                   env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"polyadapt serve did not start:\n{log.read_text()}")
                time.sleep(0.5)
            yield process
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
