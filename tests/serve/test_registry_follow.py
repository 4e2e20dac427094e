"""Registry following: a promotion and a rollback of ``support@production`` are served within seconds, without a
restart, while the server keeps answering."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.timeout(300)

PROMPT = "What is the HarborFlex monthly fee?"


def test_a_promotion_and_a_rollback_are_served_without_a_restart(server, vanilla_text):
    import polyadapt.registry

    client = server.client()

    def served() -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(model="support", prompt=PROMPT, max_tokens=8, temperature=0)
        return raw.headers["x-polyadapt-adapter"], raw.parse().choices[0].text

    def wait_for(label: str) -> tuple[str, str, float]:
        start = time.monotonic()
        while time.monotonic() - start < 30:
            found, text = served()
            if found == label:
                return found, text, time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"the server still serves {found}, not {label}")

    v1 = vanilla_text(server.runs["a0"], PROMPT, 8)
    v2 = vanilla_text(server.runs["a1"], PROMPT, 8)
    assert v1 != v2, "the two versions answer alike: the test would not see the switch"
    assert served() == ("support@v1", v1)
    reg = polyadapt.registry.open(server.registry, create=False)
    try:
        reg.alias("support@v2", "production", reason="canary looked good")
        label, text, seconds = wait_for("support@v2")
        assert text == v2 and seconds < 10
        assert {m.id: m.model_dump() for m in client.models.list().data}["support"]["version"] == "support@v2"
        reg.rollback("support", "production", reason="bad answers")
        label, text, seconds = wait_for("support@v1")
        assert text == v1 and seconds < 10
    finally:
        reg.close()
    engine = server.engine
    assert engine.source("support").current.label == "support@v1"
    # the old version is detached by the worker's scheduler once its running jobs end: soon, not at once
    deadline = time.monotonic() + 30
    while True:
        attached = sum(slot.startswith("support_") for slot in engine.workers["tiny"].cache.slots)
        if attached <= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert attached <= 1, "the old version stayed attached"
