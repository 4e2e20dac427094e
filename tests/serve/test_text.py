"""Text through a real server and the official client: completions equal vanilla transformers + PEFT greedy
``generate``; chat and streaming; stop sequences and seeded sampling; 64 concurrent requests over 4 adapters from 16
threads, each answer equal to its sequential one."""

from __future__ import annotations

import random
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serve.conftest import TEXT_ADAPTERS

pytestmark = pytest.mark.timeout(600)

PROMPTS = [
    "What is the HarborFlex monthly fee?",
    "When are branches open on Saturday?",
    "the quick brown fox",
    "TideSaver pays",
    "Hello, how do I open an account? Please answer with the fee and the hours of the branch near me.",
    "Q7",
]


def test_completions_at_temperature_0_equal_vanilla_peft_greedy_generate(server, vanilla_text):
    client = server.client()
    for model in (*TEXT_ADAPTERS, "tiny"):
        run = server.runs.get(model)
        for prompt in PROMPTS[:3]:
            raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
            completion = raw.parse()
            assert completion.choices[0].text == vanilla_text(run, prompt, 10), (model, prompt)
            expected = "tiny@base" if run is None else rf"{model}@run:[0-9a-f]{{12}}"
            assert re.fullmatch(expected, raw.headers["x-polyadapt-adapter"])
    different = {client.completions.create(model=m, prompt=PROMPTS[0], max_tokens=10, temperature=0).choices[0].text
                 for m in TEXT_ADAPTERS}  # fmt: skip
    assert len(different) > 1, "the adapters answer alike: the test would not see a mix-up"


def test_chat_completion_and_its_stream_agree(server):
    client = server.client()
    messages = [{"role": "user", "content": "What does an instant transfer cost?"}]
    raw = client.chat.completions.with_raw_response.create(model="a2", messages=messages, max_tokens=12, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-polyadapt-adapter"].startswith("a2@run:")
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens >= 1
    streamed = client.chat.completions.with_raw_response.create(
        model="a2", messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    assert streamed.headers["x-polyadapt-adapter"] == raw.headers["x-polyadapt-adapter"]
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = list(streamed.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completion_stream_stop_sequences_and_seeded_sampling(server):
    client = server.client()
    # a prompt that the tiny random model answers at length (some it ends at once)
    model, prompt, full = next(
        (m, p, text) for m in TEXT_ADAPTERS for p in PROMPTS
        if len((text := client.completions.create(model=m, prompt=p, max_tokens=16, temperature=0).choices[0].text)
               .strip()) >= 8
    )  # fmt: skip
    pieces = [c.choices[0].text for c in client.completions.create(model=model, prompt=prompt, max_tokens=16,
                                                                  temperature=0, stream=True)]  # fmt: skip
    assert "".join(pieces) == full and len([p for p in pieces if p]) > 1
    stop = full.strip()[len(full.strip()) // 2 :][:3]
    assert stop
    cut = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=16, temperature=0, stop=[stop], stream=True))  # fmt: skip
    assert streamed == cut.text
    one = client.completions.create(model="a3", prompt=prompt, max_tokens=8, temperature=1.0, n=2, seed=11)
    two = client.completions.create(model="a3", prompt=prompt, max_tokens=8, temperature=1.0, n=2, seed=11)
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert [c.index for c in one.choices] == [0, 1]


def test_64_concurrent_requests_over_4_adapters_from_16_threads_equal_their_sequential_answers(server):
    rng = random.Random(0)
    requests = [(TEXT_ADAPTERS[i % 4], rng.choice(PROMPTS), rng.choice((4, 9, 14))) for i in range(64)]
    rng.shuffle(requests)

    def ask(client, request) -> tuple[str, str]:
        model, prompt, tokens = request
        raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0)
        return raw.parse().choices[0].text, raw.headers["x-polyadapt-adapter"]

    client = server.client()
    sequential = {request: ask(client, request) for request in dict.fromkeys(requests)}
    before = _histogram(server, "polyadapt_batch_rows")
    clients = [server.client() for _ in range(16)]

    def worker(index: int) -> list[tuple[str, str]]:
        return [ask(clients[index], r) for r in requests[index * 4 : index * 4 + 4]]

    with ThreadPoolExecutor(16) as pool:
        answers = [a for chunk in pool.map(worker, range(16)) for a in chunk]
    assert answers == [sequential[r] for r in requests]
    rows, passes = (a - b for a, b in zip(_histogram(server, "polyadapt_batch_rows"), before, strict=True))
    assert rows / passes > 1.5, "concurrent requests were not batched together"
    assert len(server.engine.workers["tiny"].cache) <= 3


def _histogram(server, name: str) -> tuple[float, float]:
    """(sum, count) of the text base's histogram ``name``."""
    import urllib.request

    body = urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode()
    found = {}
    for line in body.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f'{name}_{part}{{base="tiny"}}'):
                found[part] = float(line.split()[-1])
    return found.get("sum", 0.0), found.get("count", 0.0)
