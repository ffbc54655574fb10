"""Chat completions: one code path for the direct call and the job."""

from __future__ import annotations

from typing import Any

from app.core.errors import DuplicateKey, InvalidInput, NotFound
from app.credentials.entities import Provider
from app.gateway.mock import MockBehaviour, MockProvider
from app.gateway.schemas import ChatCompletionRequest
from app.models.entities import Model
from app.storage.protocol import Storage


class ChatService:
    """Resolves the model and calls its provider."""

    def __init__(self, storage: Storage, *, mock_defaults: MockBehaviour | None = None) -> None:
        self._storage = storage
        self._mock = MockProvider()
        self._mock_defaults = mock_defaults or MockBehaviour()

    async def resolve_model(self, model_id: str) -> Model:
        """The enabled model `model_id`; unknown or disabled is `NotFound` (never a fallback)."""
        async with self._storage.unit_of_work() as uow:
            model = await uow.repo(Model).get(model_id)
        if model is None or not model.enabled:
            raise NotFound("model", model_id, param="model")
        return model

    async def complete(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """An OpenAI `chat.completion` object for `request`."""
        model = await self.resolve_model(request.model)
        if model.provider == Provider.MOCK:
            behaviour = MockBehaviour.from_parameters(model.parameters, self._mock_defaults)
            return await self._mock.chat(request, model_id=model.id, behaviour=behaviour)
        raise InvalidInput(
            f"model '{model.id}' uses provider '{model.provider}', which this gateway cannot call",
            param="model",
        )


BUILTIN_MODELS: tuple[Model, ...] = (
    Model(
        id="mock",
        name="Mock",
        description="Built-in offline model: deterministic replies, no upstream account needed.",
        provider=Provider.MOCK,
        provider_model="mock",
        context_window=128_000,
    ),
)


async def ensure_builtin_models(storage: Storage) -> None:
    """Create the built-in models that are missing (the `mock` model exists in every install)."""
    try:
        async with storage.unit_of_work() as uow:
            repo = uow.repo(Model)
            missing = [m for m in BUILTIN_MODELS if await repo.get(m.id) is None]
            for model in missing:
                await repo.add(model.model_copy())
            if missing:
                await uow.commit()
    except DuplicateKey:
        pass  # another process created them at the same moment
