"""`make demo`: adapt every installed modality offline on sample_data/ and print one before/after table, and the
forgetting check: the same before/after on each sample set's general/ data (``eval.general_data: auto``); then serve
the adapted runs with ``polyadapt serve`` and send one request per modality with the official ``openai`` client.

Each modality's demo config is examples/<modality>.yaml; its run directory is replaced on every demo.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("text", "speech", "image")
#: the environment variable holding the demo tenant's API key (a fresh random key on every demo)
KEY_ENV = "POLYADAPT_DEMO_KEY"
TEXT_PROMPT = "How good is the TideSaver rate?"
IMAGE_PROMPT = "a lighthouse by the sea"
CLIP = ROOT / "sample_data" / "speech" / "test" / "test_000.wav"


def main(argv: list[str]) -> int:
    import polyadapt
    from polyadapt.plugins import get_plugin_manager

    os.chdir(ROOT)
    wanted = argv or list(ORDER)
    installed = get_plugin_manager().modalities
    rows, general, failures = [], [], []
    adapted: dict[str, Path] = {}
    for name in wanted:
        config = ROOT / "examples" / f"{name}.yaml"
        if name not in installed or not config.exists():
            print(f"== {name}: skipped ({'not installed' if name not in installed else 'no demo config'})")
            continue
        print(f"== {name}: adapting ({config.relative_to(ROOT)})", flush=True)
        started = time.perf_counter()
        try:
            run_dir = polyadapt.adapt(config, overwrite=True)
        except polyadapt.PolyadaptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures.append(name)
            continue
        seconds = time.perf_counter() - started
        adapted[name] = run_dir
        report = json.loads((run_dir / "report.json").read_text())
        for row in report["metrics"]:
            rows.append((name, row, seconds, run_dir))
        general += [(name, row) for row in report.get("general_metrics") or []]
    if rows:
        print()
        print(f"{'modality':<8}  {'metric':<24}  {'before':>10}  {'after':>10}  {'':<6}  run")
        for name, row, _, run_dir in rows:
            print(f"{_row(name, row)}  {run_dir}/report.html")
        if general:
            print()
            print("forgetting check, on each set's general/ data (outside the domain; 'worse' is forgetting):")
            print(f"{'modality':<8}  {'metric':<24}  {'before':>10}  {'after':>10}")
            for name, row in general:
                print(_row(name, row))
        print()
        for name in dict.fromkeys(r[0] for r in rows):
            seconds = next(r[2] for r in rows if r[0] == name)
            print(f"{name}: adapted in {seconds:.0f} s")
    if adapted:
        print()
        if not _serve_step(adapted.values()):
            failures.append("serve")
    return 1 if failures else 0


@dataclass
class ServeDemo:
    """What :func:`serve_demo` did: its config and log, the server process (stopped) and, by adapter name, one answer
    per run: ``{"modality", "adapter" (the x-polyadapt-adapter header), "answer"}``."""

    config: Path
    log: Path
    process: subprocess.Popen
    answers: dict[str, dict[str, str]] = field(default_factory=dict)


def _serve_step(run_dirs: Iterable[Path]) -> bool:
    """The end of ``make demo``: serve ``run_dirs`` and print one answer each; False when serving failed."""
    import importlib.util

    missing = [m for m in ("openai", "fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"== serve: skipped ({', '.join(missing)} not installed; `make` installs them from requirements-dev.txt)")
        return True
    print("== serve: polyadapt serve runs/demo-serve.yaml, one request per adapter with the openai client", flush=True)
    try:
        result = serve_demo(run_dirs, ROOT / "runs")
    except Exception as exc:  # noqa: BLE001 - the demo reports it and exits 1
        print(f"error: serving the demo adapters failed: {exc}", file=sys.stderr)
        return False
    print(f"server stopped, exit status {result.process.returncode} (config {result.config}, log {result.log})")
    return True


def serve_demo(
    run_dirs: Iterable[Path], out_dir: Path, *, clip: Path = CLIP, max_tokens: int = 48, startup_timeout: float = 180,
    request_timeout: float = 300, stop_timeout: float = 30, env: dict[str, str] | None = None, echo: bool = True,
) -> ServeDemo:  # fmt: skip
    """Serve finished run directories with ``polyadapt serve`` in a subprocess and send one request to each with the
    official ``openai`` client: a chat completion for text, a transcription of ``clip`` for speech, one image for
    image (saved as ``out_dir/demo-serve-<adapter>.png``). One base per modality and base (read from each run's
    manifest), one adapter per run (named after its directory), one tenant whose key is random, in ``KEY_ENV``. The
    config is ``out_dir/demo-serve.yaml``, the server's output ``out_dir/demo-serve.log``. The server is stopped
    (interrupted, then killed after ``stop_timeout``) whatever happens."""
    import openai

    from polyadapt.serve.server import free_port

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, adapters = demo_serve_config(run_dirs)
    path = out_dir / "demo-serve.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    key = secrets.token_urlsafe(24)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = out_dir / "demo-serve.log"
    command = [sys.executable, "-m", "polyadapt", "serve", str(path), "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env={**os.environ, **(env or {}), KEY_ENV: key}, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    result = ServeDemo(config=path, log=log_path, process=process)
    try:
        _wait_healthy(url, process, log_path, startup_timeout)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=request_timeout)
        for name, (modality, prompt) in adapters.items():
            answer, adapter = _ask(client, name, modality, prompt, out_dir, clip, max_tokens)
            result.answers[name] = {"modality": modality, "adapter": adapter, "answer": answer}
            if echo:
                print(f"{modality:<8}  model={name}  x-polyadapt-adapter: {adapter}\n          {answer}", flush=True)
    finally:
        _stop(process, stop_timeout)
    return result


def demo_serve_config(run_dirs: Iterable[Path]) -> tuple[dict[str, Any], dict[str, tuple[str, str | None]]]:
    """The serve config for ``run_dirs`` and its adapters: name -> (modality, the prompt to send; None for speech).
    An image prompt carries the run's trigger where the run puts it."""
    bases: dict[str, dict[str, Any]] = {}
    adapters: dict[str, dict[str, str]] = {}
    requests: dict[str, tuple[str, str | None]] = {}
    for run_dir in run_dirs:
        run_dir = Path(run_dir).resolve()
        manifest = json.loads((run_dir / "polyadapt.json").read_text())
        modality, run_config, base = manifest["modality"], manifest["config"], manifest.get("base") or {}
        reference = run_config["base"]
        if "://" not in reference and not base.get("hub_id") and base.get("path"):
            reference = base["path"]  # a local directory: absolute, whatever the server's current directory
        entry: dict[str, Any] = {"modality": modality, "base": reference}
        if run_config.get("base_revision"):
            entry["base_revision"] = run_config["base_revision"]
        if run_config.get("trust_remote_code"):
            entry["trust_remote_code"] = True
        base_name = next((n for n, e in bases.items() if e == entry), None)
        if base_name is None:
            base_name = f"{modality}-base" if f"{modality}-base" not in bases else f"{modality}-base-{len(bases)}"
            bases[base_name] = entry
        name = run_dir.name
        if name in adapters:
            raise ValueError(f"two runs are called {name!r}: {adapters[name]['from']} and {run_dir}")
        adapters[name] = {"base": base_name, "from": str(run_dir)}
        prompt = {"text": TEXT_PROMPT, "image": IMAGE_PROMPT}.get(modality)
        trigger = (run_config.get("image") or {}).get("trigger") if modality == "image" else None
        if trigger:
            prefix = (run_config.get("image") or {}).get("trigger_position") == "prefix"
            prompt = f"{trigger}, {prompt}" if prefix else f"{prompt}, {trigger}"
        requests[name] = (modality, prompt)
    config = {"bases": bases, "adapters": adapters, "tenants": {"demo": {"key_env": KEY_ENV, "models": list(adapters)}}}
    return config, requests


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _ask(
    client: Any, name: str, modality: str, prompt: str | None, out_dir: Path, clip: Path, max_tokens: int
) -> tuple[str, str]:
    """One request to adapter ``name``: its answer (for an image, the saved file) and ``x-polyadapt-adapter``."""
    if modality == "text":
        raw = client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        )  # fmt: skip
        answer = f"{prompt!r} -> {raw.parse().choices[0].message.content!r}"
    elif modality == "speech":
        with open(clip, "rb") as audio:
            raw = client.audio.transcriptions.with_raw_response.create(model=name, file=audio, response_format="json")
        answer = f"{clip.name} -> {raw.parse().text!r}"
    elif modality == "image":
        raw = client.images.with_raw_response.generate(
            model=name, prompt=prompt, n=1, response_format="b64_json", extra_body={"seed": 0},
        )  # fmt: skip
        image = out_dir / f"demo-serve-{name}.png"
        image.write_bytes(base64.b64decode(raw.parse().data[0].b64_json))
        answer = f"{prompt!r} -> {image}"
    else:
        raise ValueError(f"the demo has no request for {modality} adapters ({name})")
    return answer, raw.headers.get("x-polyadapt-adapter", "")


def _stop(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is not None:
        return
    # SIGINT, as Ctrl-C: uvicorn finishes what is running and the engine closes (exit 0); after SIGTERM uvicorn
    # re-raises it and the process ends before the engine closes
    if os.name == "posix":
        process.send_signal(signal.SIGINT)
    else:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def _row(name: str, row: dict) -> str:
    """One line of a before/after table: modality, metric, before, after, better/worse."""
    before = "-" if row["before"] is None else f"{row['before']:.4f}"
    verdict = {True: "better", False: "worse", None: "same"}[row["improved"]] if "improved" in row else ""
    return f"{name:<8}  {row['metric']:<24}  {before:>10}  {row['after']:>10.4f}  {verdict:<6}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
