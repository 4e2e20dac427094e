"""``POST /v1/audio/transcriptions``: multipart ``file``, ``model``, ``language``, ``prompt``, ``response_format``
(json, text, verbose_json)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from .. import auth
from ..backend import Transcribed
from ..engine import Engine
from ..errors import APIError
from ..schemas import TRANSCRIPTION_FORMATS
from .common import get_engine, served_headers, wait

router = APIRouter(tags=["audio"])


@router.post("/v1/audio/transcriptions")
async def transcriptions(
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()],
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[str, Form()] = "json",
    temperature: Annotated[float, Form()] = 0.0,
    tenant: str = Depends(auth.tenant),
    engine: Engine = Depends(get_engine),
) -> Any:
    if response_format not in TRANSCRIPTION_FORMATS:
        raise APIError(400, f"response_format {response_format!r} is not supported "
                       f"(supported: {', '.join(TRANSCRIPTION_FORMATS)})", param="response_format")  # fmt: skip
    if temperature != 0:
        raise APIError(400, "only temperature 0 is supported (Whisper decoding here is greedy or beam search)",
                       param="temperature")  # fmt: skip
    target = engine.resolve(model, tenant, "transcriptions")
    data = await file.read()
    backend = target.worker.backend
    spec = await run_in_threadpool(
        backend.transcription_spec, data, file.filename or "audio", target.adapter, language or None, prompt or None
    )
    result: Transcribed = await wait(engine.submit(target, spec))
    engine.metrics.audio_seconds.labels(target.label).inc(result.duration)
    headers = served_headers(target)
    if response_format == "text":
        return PlainTextResponse(result.text + "\n", headers=headers)
    if response_format == "verbose_json":
        segment = {
            "id": 0, "seek": 0, "start": 0.0, "end": round(result.duration, 3), "text": result.text, "tokens": [],
            "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0,
        }  # fmt: skip
        body = {"task": "transcribe", "language": result.language or "", "duration": round(result.duration, 3),
                "text": result.text, "segments": [segment] if result.text else []}  # fmt: skip
        return JSONResponse(body, headers=headers)
    return JSONResponse({"text": result.text}, headers=headers)
