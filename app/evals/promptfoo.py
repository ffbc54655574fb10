"""A promptfoo-style YAML config read into the gateway's test cases and suite.

The supported subset (README, "Evaluations"): `description`, `prompts` (templates with
`{{ var }}`), `providers` (gateway models: `openai:<model>`, `openai:chat:<model>` or a bare
model id, with `config.temperature` / `config.max_tokens`), `tests` (`description`, `vars`,
`assert`, `threshold`), `defaultTest` (the same, merged into every test), `evaluateOptions`
(`maxConcurrency`), and the gateway's own `threshold` (the share of cases that must pass).
Every combination of prompt, provider and test is one case. Anything else is refused, naming
the key: a config that would silently run differently from promptfoo is worse than one that
does not run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.core.errors import InvalidInput
from app.core.ids import SLUG_MAX
from app.evals import assertions

TOP_LEVEL = frozenset(
    {"description", "prompts", "providers", "tests", "defaultTest", "evaluateOptions", "threshold"}
)
TEST_KEYS = frozenset({"description", "vars", "assert", "threshold", "options"})
DEFAULT_TEST_KEYS = frozenset({"vars", "assert", "threshold", "options"})
OPTIONS_KEYS = frozenset({"provider"})
PROVIDER_KEYS = frozenset({"id", "label", "config"})
PROVIDER_CONFIG_KEYS = frozenset({"temperature", "max_tokens"})
PROMPT_KEYS = frozenset({"raw", "label", "id"})
EVALUATE_KEYS = frozenset({"maxConcurrency"})
# promptfoo's assertion keys the gateway keeps (`transform`, `contextTransform`… run code).
ASSERT_KEYS = frozenset({"type", "value", "threshold", "weight", "metric", "provider"})
# Assertion types promptfoo runs as code: refused with a sentence saying why.
CODE_ASSERTIONS = frozenset({"javascript", "python", "webhook", "ruby"})
OPENAI_PREFIXES = ("openai:chat:", "openai:")
MAX_CONCURRENCY = 64
_VARIABLE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(Exception):
    """The config cannot run as written; `key` is where (`tests[2].assert[0].type`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True)
class Prompt:
    label: str
    template: str


@dataclass(frozen=True)
class Provider:
    label: str
    model: str
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class Case:
    """One prompt, provider and test: the body of `POST /admin/test-cases`."""

    id: str
    body: dict[str, Any]
    test: str
    prompt: str
    provider: str


@dataclass
class Plan:
    """What a config runs: a suite of cases, and the share of them that must pass."""

    suite_id: str
    suite: dict[str, Any]
    cases: list[Case] = field(default_factory=list)
    threshold: float | None = None


# ---- reading -----------------------------------------------------------------------------------


def load(path: Path, *, suite_id: str | None = None) -> Plan:
    """The plan of the config at `path`; `ConfigError` names the key it refuses."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    return parse(document, name=suite_id or default_suite_id(path), base=path.parent)


def default_suite_id(path: Path) -> str:
    """A stable id for the file's suite: its name, and a hash of its resolved path so two
    `promptfooconfig.yaml` of different folders do not share one suite."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{_slug(path.stem, SLUG_MAX - 18)}-{digest}"


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:limit].strip("-")
    return slug or "config"


def parse(document: Any, *, name: str, base: Path | None = None) -> Plan:
    """The plan of a config already read from YAML; `name` is the suite's id."""
    if not isinstance(document, dict):
        raise ConfigError("", "the config must be a mapping with `prompts`, `providers`, `tests`")
    _known(document, TOP_LEVEL, "", "top-level key")
    for required in ("prompts", "providers", "tests"):
        if required not in document:
            raise ConfigError(required, "is required")
    prompts = _prompts(document["prompts"], base)
    providers = _providers(document["providers"])
    default = _mapping(document.get("defaultTest", {}), "defaultTest")
    _known(default, DEFAULT_TEST_KEYS, "defaultTest", "key")
    tests = document["tests"]
    if not isinstance(tests, list) or not tests:
        raise ConfigError(
            "tests", "must be a non-empty list of tests (file references are not supported)"
        )
    judge = _judge(default, "defaultTest")
    suite: dict[str, Any] = {
        "id": name,
        "name": str(document.get("description") or name)[:200],
        "tags": ["promptfoo"],
    }
    if judge is not None:
        suite["judge_model"] = judge
    options = _mapping(document.get("evaluateOptions", {}), "evaluateOptions")
    _known(options, EVALUATE_KEYS, "evaluateOptions", "key")
    if "maxConcurrency" in options:
        concurrency = options["maxConcurrency"]
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigError(
                "evaluateOptions.maxConcurrency", "must be a whole number, at least 1"
            )
        suite["concurrency"] = min(concurrency, MAX_CONCURRENCY)
    plan = Plan(suite_id=name, suite=suite, threshold=_share(document, "threshold"))
    default_vars = _vars(default.get("vars", {}), "defaultTest.vars")
    default_asserts = _asserts(default.get("assert", []), "defaultTest.assert")
    default_threshold = _share(default, "threshold", "defaultTest.")
    for t, test in enumerate(tests):
        key = f"tests[{t}]"
        test = _mapping(test, key)
        _known(test, TEST_KEYS, key, "key")
        if _judge(test, key) is not None:
            raise ConfigError(f"{key}.options.provider", "set the grader in defaultTest.options")
        variables = default_vars | _vars(test.get("vars", {}), f"{key}.vars")
        checks = default_asserts + _asserts(test.get("assert", []), f"{key}.assert")
        threshold = _share(test, "threshold", f"{key}.")
        if threshold is None:
            threshold = default_threshold
        described = str(test.get("description") or f"test {t + 1}")
        for p, prompt in enumerate(prompts):
            message = render(prompt.template, variables, f"{key}.vars", f"prompts[{p}]")
            for m, provider in enumerate(providers):
                plan.cases.append(
                    _case(name, (t, p, m), described, prompt, provider, message, checks, threshold)
                )
    return plan


def _case(
    suite_id: str,
    index: tuple[int, int, int],
    test: str,
    prompt: Prompt,
    provider: Provider,
    message: str,
    checks: list[dict[str, Any]],
    threshold: float | None,
) -> Case:
    t, p, m = index
    suffix = f"t{t + 1}" + (f"p{p + 1}" if p else "") + (f"m{m + 1}" if m else "")
    case_id = f"{suite_id[: SLUG_MAX - len(suffix) - 1].rstrip('-')}-{suffix}"
    model_input: dict[str, Any] = {"user_message": message}
    if provider.temperature is not None:
        model_input["temperature"] = provider.temperature
    if provider.max_tokens is not None:
        model_input["max_tokens"] = provider.max_tokens
    body: dict[str, Any] = {
        "id": case_id,
        "name": f"{test} [{prompt.label} / {provider.label}]"[:200],
        "input": model_input,
        "target": {"type": "model", "model": provider.model},
        "assertions": checks,
        "tags": ["promptfoo"],
    }
    if threshold is not None:
        body["threshold"] = threshold
    return Case(case_id, body, test, prompt.label, provider.label)


def render(template: str, variables: dict[str, Any], vars_key: str, prompt_key: str) -> str:
    """`{{ name }}` replaced by the variable's value; anything fancier is refused."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _NAME.match(name):
            raise ConfigError(
                prompt_key, f"'{{{{ {name} }}}}': only plain variables are supported, no filters"
            )
        if name not in variables:
            raise ConfigError(vars_key, f"no value for '{name}', which {prompt_key} uses")
        return str(variables[name])

    if "{%" in template:
        raise ConfigError(prompt_key, "template tags ({% … %}) are not supported")
    return _VARIABLE.sub(value, template)


# ---- the parts ---------------------------------------------------------------------------------


def _known(mapping: dict[str, Any], known: frozenset[str], where: str, what: str) -> None:
    for key in mapping:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(
                path, f"unsupported {what} '{key}'; supported: {', '.join(sorted(known))}"
            )


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, "must be a mapping")
    return value


def _share(mapping: dict[str, Any], name: str, prefix: str = "") -> float | None:
    value = mapping.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"{prefix}{name}", "must be a number from 0 to 1")
    return float(value)


def _prompts(value: Any, base: Path | None) -> list[Prompt]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError("prompts", "must be a prompt or a non-empty list of prompts")
    prompts = []
    for i, item in enumerate(items):
        key = f"prompts[{i}]"
        if isinstance(item, dict):
            _known(item, PROMPT_KEYS, key, "key")
            raw = item.get("raw")
            if not isinstance(raw, str) or not raw:
                raise ConfigError(f"{key}.raw", "must be the prompt's text")
            label = str(item.get("label") or item.get("id") or f"prompt {i + 1}")
        elif isinstance(item, str) and item:
            raw, label = item, f"prompt {i + 1}"
        else:
            raise ConfigError(key, "must be a text or a mapping with `raw`")
        if raw.startswith("file://"):
            raw = _prompt_file(raw, base, key)
        prompts.append(Prompt(label, raw))
    return prompts


def _prompt_file(reference: str, base: Path | None, key: str) -> str:
    name = reference.removeprefix("file://")
    if base is None or Path(name).suffix not in (".txt", ".md", ""):
        raise ConfigError(
            key, "only text prompt files (.txt, .md) next to the config are supported"
        )
    try:
        return (base / name).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {name}: {exc.strerror or exc}") from exc


def _providers(value: Any) -> list[Provider]:
    items = [value] if isinstance(value, str | dict) else value
    if not isinstance(items, list) or not items:
        raise ConfigError("providers", "must be a provider or a non-empty list of providers")
    providers = []
    for i, item in enumerate(items):
        key = f"providers[{i}]"
        config: dict[str, Any] = {}
        if isinstance(item, dict):
            _known(item, PROVIDER_KEYS, key, "key")
            reference = item.get("id")
            config = _mapping(item.get("config", {}), f"{key}.config")
            _known(config, PROVIDER_CONFIG_KEYS, f"{key}.config", "key")
            label = item.get("label")
        else:
            reference, label = item, None
        if not isinstance(reference, str) or not reference:
            raise ConfigError(f"{key}.id" if isinstance(item, dict) else key, "must name a model")
        model = model_of(reference, key)
        temperature = config.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, int | float)
        ):
            raise ConfigError(f"{key}.config.temperature", "must be a number")
        max_tokens = config.get("max_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ConfigError(f"{key}.config.max_tokens", "must be a whole number, at least 1")
        providers.append(
            Provider(
                str(label or reference),
                model,
                None if temperature is None else float(temperature),
                max_tokens,
            )
        )
    return providers


def model_of(reference: str, key: str) -> str:
    """The gateway model a promptfoo provider id names: `openai:gpt-4o-mini`,
    `openai:chat:gpt-4o-mini` and `gpt-4o-mini` all name `gpt-4o-mini`."""
    for prefix in OPENAI_PREFIXES:
        if reference.startswith(prefix):
            return reference.removeprefix(prefix)
    head = reference.split(":", 1)[0]
    if ":" in reference and head in _PROMPTFOO_PROVIDERS:
        raise ConfigError(
            key,
            f"'{reference}' is a promptfoo provider; name a gateway model, bare or as "
            "'openai:<model>' (the gateway speaks OpenAI's API for every model it routes)",
        )
    return reference


# Provider prefixes of promptfoo that are not the gateway's (a model id may contain ':').
_PROMPTFOO_PROVIDERS = frozenset(
    {
        "anthropic", "azure", "azureopenai", "bedrock", "vertex", "google", "ollama", "exec",
        "file", "python", "http", "https", "ws", "webhook", "replicate", "huggingface", "groq",
        "mistral", "cohere", "echo", "openrouter", "localai", "llama", "vllm", "togetherai",
    }
)  # fmt: skip


def _judge(test: dict[str, Any], key: str) -> str | None:
    options = _mapping(test.get("options", {}), f"{key}.options")
    _known(options, OPTIONS_KEYS, f"{key}.options", "key")
    provider = options.get("provider")
    if provider is None:
        return None
    if not isinstance(provider, str) or not provider:
        raise ConfigError(f"{key}.options.provider", "must name a model")
    return model_of(provider, f"{key}.options.provider")


def _vars(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, str):
        raise ConfigError(key, "file references are not supported; give the variables inline")
    variables = _mapping(value, key)
    for name, item in variables.items():
        if isinstance(item, list | dict):
            raise ConfigError(
                f"{key}.{name}", "must be a text or a number (lists and mappings are not supported)"
            )
    return {str(k): "" if v is None else v for k, v in variables.items()}


def _asserts(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError(key, "must be a list of assertions")
    checks = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        item = _mapping(item, where)
        _known(item, ASSERT_KEYS, where, "assertion key")
        kind = item.get("type")
        if isinstance(kind, str) and kind.removeprefix(assertions.NOT) in CODE_ASSERTIONS:
            raise ConfigError(
                f"{where}.type", f"'{kind}' runs code, which the gateway never does; "
                "use a built-in type or llm-rubric",
            )  # fmt: skip
        check = dict(item)
        if isinstance(check.get("provider"), str):
            check["provider"] = model_of(check["provider"], f"{where}.provider")
        try:
            assertions.parse(check, param=where)
        except InvalidInput as exc:
            param = exc.param or where
            raise ConfigError(_promptfoo_key(param, where), str(exc)) from exc
        checks.append(check)
    return checks


def _promptfoo_key(param: str, where: str) -> str:
    """`tests[0].assert[1].value` from the checker's `tests[0].assert[1].value`: the same."""
    return param if param.startswith(where) else f"{where}.{param}"
