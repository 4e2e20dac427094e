"""``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true``: server-sent events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import auth
from ..backend import Generated, GenerationOptions, Job, TextDelta
from ..engine import Engine, Target
from ..errors import APIError, as_api_error, too_large
from ..retrieval import Retrieved, ServedIndex
from ..schemas import ChatRequest, CompletionRequest, Sampling
from .common import get_engine, new_id, now, served_headers, wait_all

router = APIRouter(tags=["text"])


def options_of(
    body: Sampling, limit: int | None, engine: Engine, choice: int, retrieved: Retrieved | None = None
) -> GenerationOptions:
    limits = engine.config.limits
    if limit is not None and limit > limits.max_tokens:
        raise too_large(f"max_tokens is {limit}; this server allows at most {limits.max_tokens}.", "max_tokens")
    seed = None if body.seed is None else body.seed + choice
    return GenerationOptions(
        max_tokens=limit, temperature=body.temperature, top_p=body.top_p, seed=seed, stop=tuple(body.stops),
        excerpts=tuple(retrieved.hits) if retrieved is not None else (),
    )  # fmt: skip


def retrieve(index: ServedIndex | None, query: str) -> Retrieved | None:
    """The chunks ``index`` retrieves for ``query`` (None without an index, or for an empty query)."""
    return index.search(query) if index is not None and query.strip() else None


def grounded_fields(backend: Any, spec: Any, result: Generated, retrieved: Retrieved | None) -> tuple[str, dict]:
    """The answer's text with its sources after it, and the response fields naming them (none when ungrounded)."""
    if retrieved is None:
        return result.text, {}
    text, sources = backend.sources(spec, result.text)
    return text, {"polyadapt_sources": sources, "polyadapt_index": retrieved.label}


INDEX_HEADER = "x-polyadapt-index"


def index_header(found: list[Retrieved | None]) -> dict[str, str]:
    """``x-polyadapt-index``: the index version that grounded the response (none when ungrounded)."""
    label = next((f.label for f in found if f is not None), None)
    return {INDEX_HEADER: label} if label else {}


def check_choices(body: Sampling, prompts: int, engine: Engine) -> None:
    most = engine.config.limits.max_choices
    if body.n * prompts > most:
        raise too_large(f"{body.n * prompts} choices asked; this server allows at most {most} per request.", "n")


def usage(results: list[Generated]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, tenant: str = Depends(auth.tenant), engine: Engine = Depends(get_engine)
) -> Any:
    target = engine.resolve(body.model, tenant, "completions", body.user)
    prompts = body.prompts
    check_choices(body, len(prompts), engine)
    backend = target.worker.backend
    index = engine.index_for(target)

    def specs() -> tuple[list[Any], list[Retrieved | None]]:
        found = [f for f in (retrieve(index, prompt) for prompt in prompts) for _ in range(body.n)]
        made = [
            backend.completion_spec(prompt, target.adapter, options_of(body, body.max_tokens, engine, j, found[k]))
            for k, (prompt, j) in enumerate((p, j) for p in prompts for j in range(body.n))
        ]
        return made, found

    prepared, found = await run_in_threadpool(specs)
    if body.stream:
        return stream(engine, target, prepared, chat=False, include_usage=_include_usage(body), found=found)
    results = await wait_all([engine.submit(target, spec) for spec in prepared])
    engine.metrics.count_usage(target.label, usage(results))
    answers = [grounded_fields(backend, s, r, f) for s, r, f in zip(prepared, results, found, strict=True)]
    return JSONResponse(
        {
            "id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": body.model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": r.finish_reason, **extra}
                for i, (r, (text, extra)) in enumerate(zip(results, answers, strict=True))
            ],
            "usage": usage(results),
            **(answers[0][1] if answers else {}),
        },
        headers={**served_headers(target), **index_header(found)},
    )  # fmt: skip


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatRequest, tenant: str = Depends(auth.tenant), engine: Engine = Depends(get_engine)
) -> Any:
    target = engine.resolve(body.model, tenant, "chat", body.user)
    check_choices(body, 1, engine)
    backend = target.worker.backend
    messages = [("system" if m.role == "developer" else m.role, m.text) for m in body.messages]
    index = engine.index_for(target)
    question = next((text for role, text in reversed(messages) if role == "user"), "")

    def specs() -> tuple[list[Any], list[Retrieved | None]]:
        retrieved = retrieve(index, question)
        made = [
            backend.chat_spec(messages, target.adapter, options_of(body, body.token_limit, engine, j, retrieved))
            for j in range(body.n)
        ]
        return made, [retrieved] * len(made)

    prepared, found = await run_in_threadpool(specs)
    if body.stream:
        return stream(engine, target, prepared, chat=True, include_usage=_include_usage(body), found=found)
    results = await wait_all([engine.submit(target, spec) for spec in prepared])
    engine.metrics.count_usage(target.label, usage(results))
    answers = [grounded_fields(backend, s, r, f) for s, r, f in zip(prepared, results, found, strict=True)]
    return JSONResponse(
        {
            "id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": body.model,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": r.finish_reason, **extra}
                for i, (r, (text, extra)) in enumerate(zip(results, answers, strict=True))
            ],
            "usage": usage(results),
            **(answers[0][1] if answers else {}),
        },
        headers={**served_headers(target), **index_header(found)},
    )  # fmt: skip


def _include_usage(body: Sampling) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


_DONE = object()


def stream(
    engine: Engine, target: Target, specs: list[Any], *, chat: bool, include_usage: bool,
    found: list[Retrieved | None] | None = None,
) -> StreamingResponse:  # fmt: skip
    """Server-sent events: one chunk per text delta of any choice, a last chunk per choice with its finish reason,
    optionally a usage chunk, then ``data: [DONE]``. An error after the first byte is sent as an error event. A
    grounded choice's sources come as a last text delta, and its finish chunk carries ``polyadapt_sources``."""
    backend = target.worker.backend
    found = found or [None] * len(specs)
    ident = new_id("chatcmpl" if chat else "cmpl")
    created = now()
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False, extra: dict | None = None) -> str:
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        data = {"id": ident, "object": kind, "created": created, "model": target.requested, "choices": [choice]}
        if extra:
            choice.update(extra)
            data.update(extra)
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def pusher(index: int) -> Any:
            return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        jobs: list[Job] = []
        for index, spec in enumerate(specs):
            job = engine.submit(target, spec, on_event=pusher(index))
            job.future.add_done_callback(lambda _f, i=index: loop.call_soon_threadsafe(queue.put_nowait, (i, _DONE)))
            jobs.append(job)
        results: list[Generated] = []
        try:
            if chat:
                for index in range(len(jobs)):
                    yield chunk(index, "", None, first=True)
            left = len(jobs)
            while left:
                index, event = await queue.get()
                if event is _DONE:
                    left -= 1
                    error = jobs[index].future.exception()
                    if error is not None:
                        yield f"data: {json.dumps(as_api_error(error).body())}\n\n"
                        return
                    result = jobs[index].future.result()
                    results.append(result)
                    text, extra = grounded_fields(backend, specs[index], result, found[index])
                    if text != result.text and text.startswith(result.text):
                        yield chunk(index, text[len(result.text) :], None)
                    yield chunk(index, None if chat else "", result.finish_reason, extra=extra)
                elif isinstance(event, TextDelta) and event.text:
                    yield chunk(index, event.text, None)
            engine.metrics.count_usage(target.label, usage(results))
            if include_usage:
                data = {"id": ident, "object": kind, "created": created, "model": target.requested, "choices": [],
                        "usage": usage(results)}  # fmt: skip
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                if not job.done:
                    job.cancelled.set()

    headers = {**served_headers(target), **index_header(found), "cache-control": "no-cache"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


__all__ = ["APIError", "router"]
