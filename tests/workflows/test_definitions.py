"""Workflow and external API definitions: CRUD, versions, clone, and the checks made on save
and at run (each error naming the step and field), on both storage backends."""

from __future__ import annotations

from typing import Any

import pytest

from tests.workflows.conftest import ADMIN, Gateway, chat_step


def transform(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "type": "transform", "value": value}


async def refused(gateway: Gateway, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    answer = await gateway.admin(
        "/admin/workflows", {"id": "bad", "name": "bad", "steps": steps, **extra}, status=400
    )
    error: dict[str, Any] = answer["error"]
    return error


async def test_an_update_of_the_steps_makes_a_new_version_and_keeps_the_old_one(
    gateway: Gateway,
) -> None:
    created = await gateway.workflow([transform("a", 1)])
    assert created["version"] == 1
    renamed = await gateway.http.patch("/admin/workflows/flow", json={"name": "n"}, headers=ADMIN)
    assert renamed.json()["version"] == 1, "a new name is not a new definition"
    changed = await gateway.http.patch(
        "/admin/workflows/flow", json={"steps": [transform("a", 2)]}, headers=ADMIN
    )
    assert changed.status_code == 200 and changed.json()["version"] == 2
    versions = (await gateway.http.get("/admin/workflows/flow/versions", headers=ADMIN)).json()
    assert [v["version"] for v in versions["data"]] == [2, 1]
    first = (await gateway.http.get("/admin/workflows/flow/versions/1", headers=ADMIN)).json()
    assert first["steps"] == [transform("a", 1)]
    missing = await gateway.http.get("/admin/workflows/flow/versions/9", headers=ADMIN)
    assert missing.status_code == 404


async def test_a_run_records_and_follows_the_version_it_was_submitted_with(
    gateway: Gateway,
) -> None:
    await gateway.workflow([transform("a", "one")])
    accepted = await gateway.execute(query="?async=true", status=202)
    await gateway.http.patch(
        "/admin/workflows/flow", json={"steps": [transform("a", "two")]}, headers=ADMIN
    )
    await gateway.run_jobs()
    done = await gateway.operation(accepted["operation_id"])
    assert done["metadata"]["workflow_version"] == 1
    assert done["result"]["workflow_version"] == 1 and done["result"]["output"] == "one"
    assert (await gateway.execute())["output"] == "two"


async def test_clone_copies_the_definition_under_a_new_id(gateway: Gateway) -> None:
    await gateway.workflow([transform("a", 1)], input_schema={"type": "object"})
    clone = await gateway.admin("/admin/workflows/flow/clone", {"new_id": "copy"})
    assert clone["name"] == "Copy of a flow" and clone["version"] == 1
    assert clone["steps"] == [transform("a", 1)] and clone["input_schema"] == {"type": "object"}
    taken = await gateway.admin("/admin/workflows/flow/clone", {"new_id": "copy"}, status=409)
    assert taken["error"]["param"] == "id"
    listed = (await gateway.http.get("/admin/workflows", headers=ADMIN)).json()
    assert [w["id"] for w in listed["data"]] == ["copy", "flow"]
    deleted = await gateway.http.delete("/admin/workflows/copy", headers=ADMIN)
    assert deleted.json() == {"id": "copy", "object": "workflow", "deleted": True}
    assert (await gateway.http.get("/admin/workflows/copy", headers=ADMIN)).status_code == 404


@pytest.mark.parametrize(
    ("steps", "param"),
    [
        ([transform("a", 1), transform("a", 2)], "steps[1].name"),
        ([transform("a", "${step:b:x}"), transform("b", 1)], "steps[0].value"),
        ([transform("a", "${step:a}")], "steps[0].value"),
        ([transform("a", {"deep": ["${item:x}"]})], "steps[0].value.deep[0]"),
        ([{"name": "a", "type": "nope"}], "steps[0].type"),
        ([{"name": "a", "type": "chat_completion", "user_message": "x"}], "steps[0].model_id"),
        ([chat_step("a", model_id="no-such-model")], "steps[0].model_id"),
        ([chat_step("a", model_id="${request:m}")], "steps[0].model_id"),
        ([chat_step("a", prompt_id="no-such-prompt")], "steps[0].prompt_id"),
        ([chat_step("a", response_format={"type": "yaml"})], "steps[0].response_format"),
        ([transform("a", 1) | {"output_schema": {"type": 7}}], "steps[0].output_schema"),
        ([transform("a", 1) | {"retry": {"attempts": 99}}], "steps[0].retry.attempts"),
        (
            [
                {
                    "name": "a",
                    "type": "conditional",
                    "conditions": [
                        {"field": "x", "operator": "eq", "action": {"go_to_step": "gone"}}
                    ],
                }
            ],
            "steps[0].conditions[0].action.go_to_step",
        ),
        (
            [{"name": "a", "type": "conditional", "conditions": [{"field": "x", "operator": "~"}]}],
            "steps[0].conditions[0].operator",
        ),
        (
            [{"name": "h", "type": "http_request", "external_api_id": "no-such-api"}],
            "steps[0].external_api_id",
        ),
        (
            [
                transform("a", [1]),
                {
                    "name": "p",
                    "type": "parallel",
                    "branches": {
                        "left": [transform("x", 1)],
                        "right": [chat_step("y", model_id="zz")],
                    },
                },
            ],
            "steps[1].branches.right[0].model_id",
        ),
        (
            [
                transform("a", [1]),
                {
                    "name": "m",
                    "type": "map",
                    "items": "${step:a}",
                    "steps": [transform("x", "${item}"), transform("y", "${step:z}")],
                },
            ],
            "steps[1].steps[1].value",
        ),
    ],
    ids=[
        "duplicate-name",
        "later-step",
        "itself",
        "item-outside-map",
        "unknown-type",
        "missing-field",
        "unknown-model",
        "reference-as-id",
        "unknown-prompt",
        "bad-response-format",
        "bad-output-schema",
        "retry-range",
        "go-to-unknown",
        "unknown-operator",
        "unknown-external-api",
        "nested-branch",
        "nested-map",
    ],
)
async def test_a_definition_is_refused_with_the_step_and_field_named(
    gateway: Gateway, steps: list[dict[str, Any]], param: str
) -> None:
    error = await refused(gateway, steps)
    assert error["param"] == param, error
    assert error["message"].startswith(param)


async def test_references_may_read_earlier_steps_of_enclosing_sequences(gateway: Gateway) -> None:
    await gateway.workflow(
        [
            transform("a", ["x", "y"]),
            {
                "name": "m",
                "type": "map",
                "items": "${step:a}",
                "steps": [transform("i", "${item}-${step:a:0}"), transform("j", "${step:i}!")],
            },
        ]
    )
    assert (await gateway.execute())["output"] == ["x-x!", "y-x!"]


async def test_the_input_is_checked_against_the_input_schema_naming_the_field(
    gateway: Gateway,
) -> None:
    schema = {
        "type": "object",
        "required": ["question"],
        "properties": {"question": {"type": "string"}, "n": {"type": "integer"}},
    }
    await gateway.workflow([transform("a", "${request:question}")], input_schema=schema)
    wrong = await gateway.execute(run_input={"question": "q", "n": "two"}, status=400)
    assert wrong["error"]["param"] == "input.n"
    missing = await gateway.execute(run_input={}, status=400)
    assert missing["error"]["param"] == "input"
    assert gateway.queue.sent == [], "no job for a refused input"
    bad_schema = await refused(gateway, [transform("a", 1)], input_schema={"type": "wat"})
    assert bad_schema["param"] == "input_schema"


async def test_a_disabled_or_unknown_workflow_is_not_run(gateway: Gateway) -> None:
    await gateway.workflow([transform("a", 1)], enabled=False)
    assert (await gateway.execute(status=400))["error"]["param"] == "workflow_id"
    assert (await gateway.execute("nowhere", status=404))["error"]["type"] == "not_found_error"


async def test_a_key_runs_only_the_workflows_it_is_allowed(gateway: Gateway) -> None:
    await gateway.workflow([transform("a", 1)])
    await gateway.workflow([transform("a", 2)], id="other")
    key = await gateway.key(permissions={"workflows": ["flow"]})
    assert (await gateway.execute(headers=key))["output"] == 1
    denied = await gateway.execute("other", headers=key, status=403)
    assert denied["error"]["param"] == "workflow_id"


async def test_chat_steps_are_bound_by_the_callers_model_permissions(gateway: Gateway) -> None:
    await gateway.workflow([chat_step("a")])
    key = await gateway.key(permissions={"models": ["mock"]})
    failed = await gateway.execute(headers=key)
    assert failed["success"] is False and failed["status"] == "failed"
    assert failed["steps"][0]["error"]["type"] == "permission_denied"


# ---- external APIs -------------------------------------------------------------------------


async def test_external_apis_round_trip_and_check_their_credential(gateway: Gateway) -> None:
    await gateway.admin(
        "/admin/credentials",
        {"id": "api-key", "provider": "http_api_key", "secret": "s3cret-value-1234"},
    )
    created = await gateway.admin(
        "/admin/external-apis",
        {
            "id": "crm",
            "name": "CRM",
            "base_url": "http://127.0.0.1:9/api",
            "base_headers": {"x-team": "a"},
            "credential_id": "api-key",
        },
    )
    assert created["credential_id"] == "api-key" and "s3cret" not in str(created)
    changed = await gateway.http.patch(
        "/admin/external-apis/crm", json={"enabled": False}, headers=ADMIN
    )
    assert changed.json()["enabled"] is False
    wrong = await gateway.admin(
        "/admin/external-apis",
        {"id": "x", "name": "x", "base_url": "http://127.0.0.1:9", "credential_id": "nope"},
        status=400,
    )
    assert wrong["error"]["param"] == "credential_id"
    await gateway.admin(
        "/admin/credentials", {"id": "llm-key", "provider": "openai", "secret": "sk-abc-12345678"}
    )
    llm_key = await gateway.admin(
        "/admin/external-apis",
        {"id": "x", "name": "x", "base_url": "http://127.0.0.1:9", "credential_id": "llm-key"},
        status=400,
    )
    assert "http_api_key" in llm_key["error"]["message"]


async def test_an_external_api_a_workflow_calls_cannot_be_deleted(gateway: Gateway) -> None:
    await gateway.admin(
        "/admin/external-apis", {"id": "crm", "name": "CRM", "base_url": "http://127.0.0.1:9"}
    )
    await gateway.workflow([{"name": "h", "type": "http_request", "external_api_id": "crm"}])
    in_use = await gateway.http.delete("/admin/external-apis/crm", headers=ADMIN)
    assert in_use.status_code == 409 and "flow" in in_use.json()["error"]["message"]
    await gateway.http.delete("/admin/workflows/flow", headers=ADMIN)
    gone = await gateway.http.delete("/admin/external-apis/crm", headers=ADMIN)
    assert gone.status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080",
        "http://localhost/x",
        "http://10.1.2.3/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "ftp://example.com/",
        "http://user:pw@example.com/",
    ],
)
@pytest.mark.parametrize("overrides", [{"OUTBOUND_ALLOWED_HOSTS": ""}], indirect=True)
async def test_an_external_api_at_a_private_or_loopback_address_is_refused(
    gateway: Gateway, url: str
) -> None:
    refused_ = await gateway.admin(
        "/admin/external-apis", {"id": "x", "name": "x", "base_url": url}, status=400
    )
    assert refused_["error"]["param"] == "base_url"
    await gateway.admin(
        "/admin/external-apis", {"id": "ok", "name": "ok", "base_url": "https://example.com"}
    )
    moved = await gateway.http.patch(
        "/admin/external-apis/ok", json={"base_url": url}, headers=ADMIN
    )
    assert moved.status_code == 400 and moved.json()["error"]["param"] == "base_url"
