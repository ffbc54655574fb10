"""Demo data so a fresh install answers out of the box: mock credential, models, chain, prompts.

Seeding only adds what is missing, never overwrites: running it twice (or after an operator
changed a seeded row) leaves everything as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from app.config import Settings
from app.core.crypto import SecretBox
from app.core.errors import Conflict, NotFound
from app.credentials.entities import Provider
from app.credentials.schemas import CredentialCreate
from app.credentials.service import CredentialService
from app.gateway.chains import ChainService
from app.gateway.schemas import ChainCreate, ChainStep
from app.models.schemas import ModelCreate, ModelParameters
from app.models.service import ModelService
from app.prompts.schemas import PRODUCTION, PromptCreate
from app.prompts.service import PromptService

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)

MOCK_CREDENTIAL = CredentialCreate(
    id="mock", name="Built-in mock provider (no secret needed)", provider=Provider.MOCK
)


def _mock_model(model_id: str, description: str, **behaviour: float) -> ModelCreate:
    return ModelCreate(
        id=model_id,
        name=model_id,
        description=description,
        provider=Provider.MOCK,
        provider_model="mock",
        credential_id=MOCK_CREDENTIAL.id,
        parameters=ModelParameters.model_validate(behaviour),
        context_window=128_000,
        input_price_per_million=Decimal("0.10"),
        output_price_per_million=Decimal("0.40"),
    )


MODELS = (
    _mock_model("mock-fast", "Mock model that answers at once.", mock_latency_ms=0),
    _mock_model("mock-slow", "Mock model that takes 1.5 s to answer.", mock_latency_ms=1500),
    _mock_model(
        "mock-flaky", "Mock model that fails half of the time (transient).", mock_failure_rate=0.5
    ),
)

PROMPTS = (
    PromptCreate(
        id="greeting",
        name="Greeting",
        description="Greets a user by name.",
        content=(
            "You are a friendly assistant. Greet ${var:user_name:there} warmly in one sentence."
        ),
        tags=["demo"],
        labels=[PRODUCTION],
    ),
    PromptCreate(
        id="summarize",
        name="Summarize",
        description="Summarizes a text in a bounded number of words.",
        content=(
            "Summarize the following text in at most ${var:max-words:50} words.\n\n${var:text}"
        ),
        tags=["demo"],
        labels=[PRODUCTION],
    ),
    PromptCreate(
        id="translate",
        name="Translate",
        description="Translates a text into a target language.",
        content="Translate into ${var:target_language:English}:\n\n${var:text}",
        tags=["demo"],
        labels=[PRODUCTION],
    ),
)


CHAINS = (
    ChainCreate(
        id="mock-resilient",
        name="Flaky mock with a fallback",
        description="mock-flaky, retried once, then mock-fast: always answers.",
        steps=[
            ChainStep(model_id="mock-flaky", max_retries=1, backoff_ms=50),
            ChainStep(model_id="mock-fast"),
        ],
    ),
)


@dataclass
class SeedReport:
    """What a run created (what already existed is not listed)."""

    created: list[str] = field(default_factory=list)


async def seed(
    credentials: CredentialService,
    models: ModelService,
    prompts: PromptService,
    chains: ChainService | None = None,
) -> SeedReport:
    """Create every demo row that is missing; safe to run any number of times."""
    report = SeedReport()
    if await _missing(credentials.get, MOCK_CREDENTIAL.id):
        await _create(
            report, f"credential {MOCK_CREDENTIAL.id}", credentials.create(MOCK_CREDENTIAL)
        )
    for model in MODELS:
        if await _missing(models.get, model.id):
            await _create(report, f"model {model.id}", models.create(model))
    for prompt in PROMPTS:
        if await _missing(prompts.get, prompt.id):
            await _create(report, f"prompt {prompt.id}", prompts.create(prompt))
    if chains is not None:
        await seed_chains(report, chains)
    if report.created:
        log.info("seeded %s", ", ".join(report.created))
    return report


async def seed_services(services: Services) -> SeedReport:
    """Seed through a process's services (what `gateway dev` does on memory storage)."""
    return await seed(services.credentials, services.models, services.prompts, services.chains)


async def seed_database(settings: Settings) -> SeedReport:
    """`gateway seed`: seed the configured PostgreSQL database."""
    from app.storage.factory import build_durable_storage

    storage = build_durable_storage(
        settings,
        why="forgets the data when this command exits",
        hint="; `gateway dev` seeds memory by itself",
    )
    try:
        return await seed(
            CredentialService(storage, SecretBox(settings.secret_keys())),
            ModelService(storage),
            PromptService(storage),
            ChainService(storage, on_change=lambda chain_id: None),
        )
    finally:
        await storage.close()


async def seed_chains(report: SeedReport, chains: ChainService) -> None:
    """The demo chain: the flaky mock, retried once, falling back to the fast one."""
    for chain in CHAINS:
        if await _missing(chains.get, chain.id):
            await _create(report, f"chain {chain.id}", chains.create(chain))


async def _missing(get: Callable[[str], Awaitable[object]], entity_id: str) -> bool:
    try:
        await get(entity_id)
    except NotFound:
        return True
    return False


async def _create(report: SeedReport, what: str, creating: Awaitable[object]) -> None:
    try:
        await creating
    except Conflict:
        return  # another process seeded it at the same moment
    report.created.append(what)
