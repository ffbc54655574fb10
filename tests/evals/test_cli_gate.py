"""`gateway eval run`: promptfoo-style configs read into cases and a suite, refused naming the
key they do not support, and run in process as a CI gate whose exit status is the verdict."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from app.cli import load_settings, main
from app.commands import in_process_gateway
from app.config import ProcessRole
from app.evals import gate
from app.evals.promptfoo import ConfigError, load, parse

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "promptfoo" / "promptfooconfig.yaml"


def sample() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    return document


def write(tmp_path: Path, document: dict[str, Any], name: str = "gate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


# ---- parsing -----------------------------------------------------------------------------------


def test_the_sample_becomes_one_case_per_prompt_provider_and_test() -> None:
    plan = load(SAMPLE)
    assert len(plan.cases) == 2 * 2 * 2 and plan.threshold == 1.0
    assert plan.suite["name"] == "Greetings answered by the mock model"
    first = plan.cases[0].body
    assert first["input"] == {"user_message": "Say hello to Paris"}
    assert first["target"] == {"type": "model", "model": "mock"}
    # defaultTest's assertions first, then the test's own.
    assert [a["type"] for a in first["assertions"]] == [
        "starts-with", "latency", "icontains", "not-contains",
    ]  # fmt: skip
    fast = plan.cases[1].body
    assert fast["target"] == {"type": "model", "model": "mock-fast"}
    assert fast["input"]["temperature"] == 0.0
    formal = plan.cases[2].body
    assert formal["input"]["user_message"] == "Write a formal greeting for the people of Paris"
    ids = [c.id for c in plan.cases]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(plan.suite_id) for i in ids)
    # The ids come from the file: reading it again gives the same ones.
    assert [c.id for c in load(SAMPLE).cases] == ids


def test_provider_ids_name_gateway_models() -> None:
    document = {
        "prompts": "Hi {{ who }}",
        "providers": ["openai:chat:gpt-4o-mini", "llama3.1:8b", {"id": "openai:mock"}],
        "tests": [{"vars": {"who": "you"}}],
        "defaultTest": {"options": {"provider": "openai:mock"}},
        "evaluateOptions": {"maxConcurrency": 500},
    }
    plan = parse(document, name="models")
    models = [c.body["target"]["model"] for c in plan.cases]
    assert models == ["gpt-4o-mini", "llama3.1:8b", "mock"]
    assert plan.suite["judge_model"] == "mock" and plan.suite["concurrency"] == 64
    assert plan.cases[0].body["input"]["user_message"] == "Hi you"


def test_a_prompt_file_next_to_the_config_is_read(tmp_path: Path) -> None:
    (tmp_path / "greet.txt").write_text("Greet {{city}}")
    path = write(tmp_path, {**sample(), "prompts": ["file://greet.txt"]})
    plan = load(path)
    assert plan.cases[0].body["input"]["user_message"] == "Greet Paris"


def _with_test(**test: Any) -> dict[str, Any]:
    return {"prompts": ["Hi {{name}}"], "providers": ["mock"], "tests": [test]}


@pytest.mark.parametrize(
    ("document", "key", "words"),
    [
        ({**sample(), "scenarios": []}, "scenarios", "unsupported top-level key"),
        ({**sample(), "redteam": {}}, "redteam", "unsupported top-level key"),
        ({"prompts": ["x"], "providers": ["mock"]}, "tests", "required"),
        ({**sample(), "tests": "file://tests.csv"}, "tests", "file references"),
        (
            _with_test()
            | {
                "tests": [
                    {"vars": {"name": "a"}, "assert": [{"type": "javascript", "value": "true"}]}
                ]
            },
            "tests[0].assert[0].type",
            "runs code",
        ),
        (
            _with_test()
            | {
                "tests": [{"vars": {"name": "a"}, "assert": [{"type": "not-python", "value": "1"}]}]
            },
            "tests[0].assert[0].type",
            "runs code",
        ),
        (
            _with_test()
            | {
                "tests": [
                    {
                        "vars": {"name": "a"},
                        "assert": [
                            {"type": "contains", "value": "a", "transform": "output.trim()"}
                        ],
                    }
                ]
            },
            "tests[0].assert[0].transform",
            "unsupported assertion key",
        ),
        (
            _with_test() | {"tests": [{"vars": {"name": "a"}, "assert": [{"type": "perplexity"}]}]},
            "tests[0].assert[0].type",
            "unknown assertion type",
        ),
        (
            _with_test()
            | {"tests": [{"vars": {"name": "a"}, "assert": [{"type": "regex", "value": "(open"}]}]},
            "tests[0].assert[0].value",
            "",
        ),
        (
            _with_test() | {"tests": [{"vars": {"name": ["a", "b"]}}]},
            "tests[0].vars.name",
            "lists",
        ),
        (_with_test() | {"tests": [{"vars": {}}]}, "tests[0].vars", "no value for 'name'"),
        (
            _with_test() | {"prompts": ["{% if x %}hi{% endif %}"], "tests": [{}]},
            "prompts[0]",
            "template tags",
        ),
        (
            _with_test() | {"prompts": ["{{ name | upper }}"], "tests": [{"vars": {"name": "a"}}]},
            "prompts[0]",
            "plain variables",
        ),
        (
            _with_test() | {"providers": ["anthropic:messages:claude-3"], "tests": [{}]},
            "providers[0]",
            "promptfoo provider",
        ),
        (
            _with_test() | {"providers": [{"id": "mock", "config": {"apiKey": "x"}}]},
            "providers[0].config.apiKey",
            "unsupported key",
        ),
        (_with_test(vars={"name": "a"}, options={"cache": False}), "tests[0].options.cache", ""),
        ({**sample(), "threshold": 2}, "threshold", "from 0 to 1"),
        ({**sample(), "evaluateOptions": {"repeat": 3}}, "evaluateOptions.repeat", ""),
    ],
)
def test_an_unsupported_config_is_refused_naming_the_key(
    document: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(document, name="refused")
    assert refused.value.key == key
    assert words in str(refused.value) and str(refused.value).startswith(key)


# ---- running -----------------------------------------------------------------------------------


def test_the_sample_passes_in_process_and_writes_its_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "results.json"
    assert main(["eval", "run", str(SAMPLE), "--in-process", "--output", str(output)]) == 0
    shown = capsys.readouterr()
    assert "PASSED: 8/8 cases passed" in shown.out
    assert "8/8" in shown.err and "(completed)" in shown.err
    report = orjson.loads(output.read_bytes())
    assert report["passed"] is True and report["pass_rate"] == 1.0
    assert report["run"]["status"] == "completed" and len(report["results"]) == 8
    assert all(r["result"]["outcome"] == "passed" for r in report["results"])


def failing(tmp_path: Path) -> Path:
    """The sample with one test the mock cannot pass: 6 of its 8 cases pass."""
    document = sample()
    document["tests"][1]["assert"].append({"type": "contains", "value": "Konnichiwa"})
    document["prompts"] = document["prompts"][:1]
    # Paris (2 cases) pass, Tokyo (2 cases) fail: half of the cases pass.
    return write(tmp_path, document)


def test_a_run_below_its_threshold_exits_1_and_at_it_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(failing(tmp_path))
    assert main(["eval", "run", path, "--in-process", "--threshold", "0.75"]) == 1
    shown = capsys.readouterr().out
    assert "FAILED: 2/4 cases passed" in shown
    assert "FAIL" in shown and "Konnichiwa" in shown
    assert main(["eval", "run", path, "--in-process", "--threshold", "0.5"]) == 0
    assert "PASSED: 2/4" in capsys.readouterr().out


def test_the_config_threshold_is_the_default(tmp_path: Path) -> None:
    document = yaml.safe_load(failing(tmp_path).read_text()) | {"threshold": 0.5}
    assert main(["eval", "run", str(write(tmp_path, document, "half.yaml")), "--in-process"]) == 0
    document["threshold"] = 0.9
    assert main(["eval", "run", str(write(tmp_path, document, "most.yaml")), "--in-process"]) == 1


def test_a_config_error_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {**sample(), "sharing": True})
    assert main(["eval", "run", str(path), "--in-process"]) == 2
    assert "sharing: unsupported top-level key 'sharing'" in capsys.readouterr().err


def test_a_model_the_gateway_does_not_have_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {**sample(), "providers": ["openai:gpt-nonexistent"]})
    assert main(["eval", "run", str(path), "--in-process"]) == 2
    assert "target.model" in capsys.readouterr().err


def test_without_a_gateway_url_it_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_URL", raising=False)
    monkeypatch.delenv("GATEWAY_API_KEY", raising=False)
    assert main(["eval", "run", str(SAMPLE)]) == 2
    assert "--url" in capsys.readouterr().err


def test_a_gateway_out_of_reach_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--url", "http://127.0.0.1:9", "--api-key", "gw-some-key"]
    assert main(["eval", "run", str(SAMPLE), *args]) == 3
    assert "cannot reach the gateway at http://127.0.0.1:9" in capsys.readouterr().err


async def test_running_the_same_file_again_reuses_its_cases_and_suite(tmp_path: Path) -> None:
    settings = load_settings(
        PROCESS_ROLE=ProcessRole.DEV, STORAGE_BACKEND="memory", BROKER="stub",
        ADMIN_API_KEY=None, ADMIN_DEFAULT_PASSWORD="admin-password-for-tests",
    )  # fmt: skip
    path = failing(tmp_path)
    async with in_process_gateway(settings) as (client, _):
        first = await gate.run(client, load(path), 1.0, poll_seconds=0.05, progress=io.StringIO())
        assert not first.passed and first.pass_rate == 0.5
        # The file is fixed: the same ids are updated, and the suite runs the new assertions.
        document = yaml.safe_load(path.read_text())
        document["tests"][1]["assert"].pop()
        path.write_text(yaml.safe_dump(document))
        plan = load(path)
        again = await gate.run(client, plan, 1.0, poll_seconds=0.05, progress=None)
        assert again.passed and again.run["id"] != first.run["id"]
        cases = (await client.get("/admin/test-cases", params={"limit": 100})).json()["data"]
        assert sorted(c["id"] for c in cases) == sorted(c.id for c in plan.cases)
        suites = (await client.get("/admin/test-suites")).json()["data"]
        assert [s["id"] for s in suites] == [plan.suite_id]
        assert suites[0]["pass_threshold"] == 1.0
