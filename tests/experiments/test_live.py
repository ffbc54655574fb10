"""A running experiment intercepts the calls on its model or prompt on the one call path: each
unit keeps its variant, each call leaves a record, and clients attach feedback (both backends)."""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from typing import Any

import pytest

from app.core.errors import Unavailable
from app.experiments.assignment import bucket
from app.experiments.entities import Experiment, ExperimentRecord, RecordSource, TargetKind
from app.experiments.live import RecordWriter
from app.storage.protocol import Storage, Where
from tests.experiments.conftest import ADMIN as ADMIN_HEADERS
from tests.experiments.conftest import Gateway, chat, experiment, variant


async def test_each_key_keeps_its_variant_and_each_call_leaves_a_record(
    gateway: Gateway,
) -> None:
    await gateway.running(experiment())
    keys = [await gateway.client_key(f"client-{i}") for i in range(12)]

    answered: dict[str, set[str]] = defaultdict(set)
    request_ids = {}
    for headers, key_id in keys:
        for _ in range(2):
            response = await gateway.http.post("/v1/chat/completions", json=chat(), headers=headers)
            assert response.status_code == 200, response.text
            answered[key_id].add(response.headers["x-gateway-model"])
            request_ids[response.headers["x-request-id"]] = key_id

    records = await gateway.records()
    assert len(records) == 24
    variants: dict[str, set[str]] = defaultdict(set)
    for record in records:
        variants[record.unit or ""].add(record.variant_id)
        assert record.source is RecordSource.LIVE and record.success and record.error is None
        assert record.unit == record.api_key_id == request_ids[record.request_id or ""]
        assert (record.input_tokens, record.output_tokens, record.cost_micros) == (5, 7, 80)
        assert record.latency_ms >= 0 and record.first_token_ms is None
        expected_model = "other" if record.variant_id == "other" else "base"
        assert record.model_id == expected_model
        assert answered[record.unit or ""] == {expected_model}
    assert all(len(v) == 1 for v in variants.values()), "a key saw two variants"
    assert {v for vs in variants.values() for v in vs} == {"control", "other"}


async def test_calls_are_left_alone_without_a_running_experiment_on_their_model(
    gateway: Gateway,
) -> None:
    await gateway.post("/admin/experiments", experiment(), 201)
    await gateway.post("/v1/chat/completions", chat())  # a draft intercepts nothing
    await gateway.post("/admin/experiments/exp/start")
    await gateway.post("/v1/chat/completions", chat("other"))  # another model
    assert await gateway.records() == []

    await gateway.post("/v1/chat/completions", chat())
    await gateway.post("/admin/experiments/exp/pause")
    await gateway.post("/v1/chat/completions", chat())
    assert len(await gateway.records()) == 1
    await gateway.post("/admin/experiments/exp/resume")
    await gateway.post("/v1/chat/completions", chat())
    assert len(await gateway.records()) == 2


async def test_a_failing_variant_records_its_errors(gateway: Gateway) -> None:
    salt = "a-failing-variant"
    body = experiment(
        unit="user",
        salt=salt,
        variants=[variant("control", 1, control=True), variant("broken", 99, model="broken")],
    )
    await gateway.running(body)
    # A user outside control's 1 % (its first 100 buckets): the assignment is not left to chance.
    user = next(u for u in (f"user-{i}" for i in range(1000)) if bucket(salt, u) >= 100)

    response = await gateway.http.post(
        "/v1/chat/completions", json=chat(user=user), headers=ADMIN_HEADERS
    )

    assert response.status_code >= 400
    (record,) = await gateway.records()
    assert record.variant_id == "broken" and not record.success
    assert record.error is not None and "simulated 400" in record.error


async def test_the_user_field_assigns_and_a_call_without_it_is_not_enrolled(
    gateway: Gateway,
) -> None:
    await gateway.running(experiment(unit="user"))

    plain = await gateway.http.post("/v1/chat/completions", json=chat(), headers=ADMIN_HEADERS)
    assert plain.headers["x-gateway-model"] == "base"
    assert await gateway.records() == []
    for user in ("alice", "bob", "carol", "dave", "erin", "frank") * 2:
        await gateway.post("/v1/chat/completions", chat(user=user))

    records = await gateway.records()
    assert len(records) == 12
    seen: dict[str, set[str]] = defaultdict(set)
    for record in records:
        seen[record.unit or ""].add(record.variant_id)
    assert set(seen) == {"alice", "bob", "carol", "dave", "erin", "frank"}
    assert all(len(v) == 1 for v in seen.values())


async def test_the_experiment_unit_header_assigns_direct_streamed_and_async_calls(
    gateway: Gateway,
) -> None:
    body = experiment(
        unit="header",
        variants=[variant("control", 0.01, control=True), variant("other", 99.99, model="other")],
        salt="fixed",
    )
    await gateway.running(body)
    unit = {"X-Experiment-Unit": "device-7", **ADMIN_HEADERS}

    direct = await gateway.http.post("/v1/chat/completions", json=chat(), headers=unit)
    streamed = await gateway.http.post(
        "/v1/chat/completions",
        json=chat(stream=True, stream_options={"include_usage": True}),
        headers=unit,
    )
    job = await gateway.http.post("/v1/chat/completions?async=true", json=chat(), headers=unit)
    assert direct.headers["x-gateway-model"] == "other"
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert job.status_code == 202, job.text
    assert await gateway.run_jobs() == 1

    records = await gateway.records()
    assert len(records) == 3
    assert {r.unit for r in records} == {"device-7"} and {r.variant_id for r in records} == {
        "other"
    }
    stream_record = next(r for r in records if r.first_token_ms is not None)
    assert stream_record.latency_ms >= (stream_record.first_token_ms or 0)
    assert (stream_record.input_tokens, stream_record.output_tokens) == (5, 7)
    assert stream_record.cost_micros == 80
    job_record = next(r for r in records if r.operation_id is not None)
    assert job_record.request_id == job.json()["operation_id"]


async def test_a_prompt_experiment_renders_the_version_of_each_variant(gateway: Gateway) -> None:
    await gateway.post(
        "/admin/prompts", {"id": "greet", "content": "Version one for ${var:name}"}, 201
    )
    response = await gateway.http.patch(
        "/admin/prompts/greet",
        json={"content": "Version two for ${var:name}"},
        headers=ADMIN_HEADERS,
    )
    assert response.status_code == 200, response.text
    body = experiment(
        target_kind="prompt",
        target="greet",
        unit="user",
        variants=[
            variant("v1", 50, control=True, prompt_version=1),
            variant("v2", 50, prompt_version=2),
        ],
    )
    await gateway.running(body)

    replies: dict[str, str] = {}
    for user in [f"user-{i}" for i in range(8)]:
        message = {"role": "user", "prompt_id": "greet", "variables": {"name": user}}
        answer = await gateway.post(
            "/v1/chat/completions",
            {"model": "base", "messages": [message], "user": user},
        )
        replies[user] = answer["choices"][0]["message"]["content"]

    records = {r.unit: r.variant_id for r in await gateway.records()}
    assert len(records) == 8 and set(records.values()) == {"v1", "v2"}
    for user, reply in replies.items():
        version = "one" if records[user] == "v1" else "two"
        assert f"Version {version} for {user}" in reply


async def test_feedback_attaches_to_the_callers_own_call(gateway: Gateway) -> None:
    await gateway.running(experiment())
    headers, _ = await gateway.client_key()
    stranger, _ = await gateway.client_key("stranger")
    response = await gateway.http.post("/v1/chat/completions", json=chat(), headers=headers)
    request_id = response.headers["x-request-id"]

    given = await gateway.post(
        "/v1/feedback",
        {"request_id": request_id, "score": 4.5, "label": "helpful"},
        headers=headers,
    )

    (record,) = await gateway.records(Where.eq("request_id", request_id))
    assert given == {
        "object": "experiment.feedback",
        "request_id": request_id,
        "experiment_id": "exp",
        "variant_id": record.variant_id,
        "score": 4.5,
        "label": "helpful",
    }
    assert (record.feedback_score, record.feedback_label) == (4.5, "helpful")
    relabelled = await gateway.post(
        "/v1/feedback", {"request_id": request_id, "label": "wrong"}, headers=headers
    )
    assert relabelled["score"] == 4.5 and relabelled["label"] == "wrong"
    other = await gateway.post(
        "/v1/feedback", {"request_id": request_id, "score": 1}, 404, headers=stranger
    )
    assert other["error"]["param"] == "request_id"
    for body, param in (
        ({"request_id": request_id}, None),
        ({"request_id": request_id, "score": "high"}, "score"),
        ({"request_id": "has spaces", "score": 1}, "request_id"),
        ({"score": 1}, "request_id"),
        ({"request_id": request_id, "label": ""}, "label"),
    ):
        refused = await gateway.post("/v1/feedback", body, 400, headers=headers)
        assert refused["error"]["param"] == param, body
    await gateway.post("/v1/feedback", {"request_id": "req_unknown", "score": 1}, 404)
    await gateway.post("/admin/experiments/exp/complete")
    closed = await gateway.post(
        "/v1/feedback", {"request_id": request_id, "score": 2}, 409, headers=headers
    )
    assert closed["error"]["param"] == "request_id"


class _Flaky:
    """A storage whose units of work fail while `down`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.down = False
        self.name = storage.name

    def unit_of_work(self, *, autocommit: bool = False) -> Any:
        if self.down:
            raise Unavailable("database down (fake)")
        return self.storage.unit_of_work(autocommit=autocommit)


async def test_live_records_are_written_in_batches_and_kept_while_storage_is_down(
    storage: Storage,
) -> None:
    async with storage.unit_of_work() as uow:
        await uow.repo(Experiment).add(
            Experiment(id="exp", name="e", target_kind=TargetKind.MODEL, target="m", salt="s")
        )
        await uow.commit()
    flaky = _Flaky(storage)
    writer = RecordWriter(flaky, interval=0.05)  # type: ignore[arg-type]

    async def stored() -> int:
        async with storage.unit_of_work() as uow:
            return await uow.repo(ExperimentRecord).count()

    def record(i: int) -> ExperimentRecord:
        return ExperimentRecord(id=f"r{i}", experiment_id="exp", variant_id="a")

    for i in range(3):
        writer.add(functools.partial(record, i))
    assert await stored() == 0
    await asyncio.sleep(0.2)
    assert await stored() == 3
    flaky.down = True
    writer.add(functools.partial(record, 3))
    await writer.flush()
    assert await stored() == 3
    flaky.down = False
    writer.add(functools.partial(record, 4))
    await writer.close()
    assert await stored() == 5


async def test_calls_go_as_asked_when_the_running_experiments_cannot_be_read(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    await gateway.running(
        experiment(variants=[variant("c", 0.01, control=True), variant("o", 99.99, model="other")])
    )
    live = gateway.services.live_experiments
    flaky = _Flaky(gateway.storage)
    flaky.down = True
    monkeypatch.setattr(live, "_storage", flaky)
    live._running.clear()

    response = await gateway.http.post("/v1/chat/completions", json=chat(), headers=ADMIN_HEADERS)

    assert response.status_code == 200 and response.headers["x-gateway-model"] == "base"
    assert await gateway.records() == []
