"""The import rules of `make lint` (`[tool.importlinter]` in pyproject.toml) catch what they
forbid: each test lints a copy of app/ and workers/ with one wrong import added."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts lint-imports

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONTRACTS = {
    contract["id"]: contract["name"]
    for contract in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
}
LAYERS = CONTRACTS["app-layers"]
WORKERS = CONTRACTS["workers-on-top"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and of pyproject.toml, to break."""
    for package in ("app", "workers"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # Run in the copy, which comes first on sys.path: the copy is linted, not the installed tree.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
    )


def add_import(tree: Path, module: str, statement: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{statement}  # noqa\n")


def assert_broken(result: subprocess.CompletedProcess[str], contract: str, why: str) -> None:
    assert result.returncode != 0, result.stdout
    assert f"{contract} BROKEN" in result.stdout, result.stdout
    assert why in result.stdout, result.stdout


def test_the_packages_as_they_are_keep_every_contract(tree: Path) -> None:
    result = lint(tree)

    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in result.stdout


def test_the_base_importing_a_domain_breaks_the_layers(tree: Path) -> None:
    add_import(tree, "app.core.clock", "import app.gateway.routing")

    assert_broken(lint(tree), LAYERS, "app.core is not allowed to import app.gateway")


def test_a_domain_importing_a_composition_root_breaks_the_layers(tree: Path) -> None:
    add_import(tree, "app.prompts.service", "from app.services import Services")

    assert_broken(lint(tree), LAYERS, "app.prompts is not allowed to import app.services")


def test_a_cycle_between_two_domains_breaks_the_layers(tree: Path) -> None:
    # app.usage imports app.logs (execution logs); the way back closes a cycle.
    add_import(tree, "app.logs.service", "from app.usage.pricing import model_cost_micros")

    assert_broken(lint(tree), LAYERS, "app.logs is not allowed to import app.usage")


def test_domains_on_one_layer_are_independent(tree: Path) -> None:
    add_import(tree, "app.prompts.service", "from app.settings.registry import registry_for")

    assert_broken(lint(tree), LAYERS, "app.prompts is not allowed to import app.settings")


def test_app_importing_workers_breaks_its_contract(tree: Path) -> None:
    add_import(tree, "app.seed", "import workers.runtime")

    assert_broken(lint(tree), WORKERS, "app.seed -> workers.runtime")


def test_a_new_package_must_be_given_a_layer(tree: Path) -> None:
    (tree / "app" / "reports").mkdir()
    (tree / "app" / "reports" / "__init__.py").write_text('"""Not placed in any layer."""\n')

    assert_broken(lint(tree), LAYERS, "not listed as layers:\n\n- app.reports")
