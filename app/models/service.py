"""The model registry: the names clients call, where they go, and what they cost."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable

from app.core.clock import utcnow
from app.core.errors import Conflict, DuplicateKey, InvalidInput, NotFound
from app.core.invalidation import METERING_TOPIC, InvalidationBus
from app.core.outbound import OutboundPolicy
from app.credentials.entities import Provider, StoredCredential
from app.models.entities import Model, ModelChain
from app.models.schemas import ModelCreate, ModelUpdate
from app.storage.protocol import Page, Storage, UnitOfWork, Where, given
from app.storage.reads import delete_existing, get_existing, read_existing, read_page

log = logging.getLogger(__name__)

# A change to any of these changes the answers the model gives, so cached ones must not be reused.
ANSWER_FIELDS = ("kind", "provider", "provider_model", "credential_id", "parameters")
_LISTED_MAX = 1000
_SHOWN_IN_CONFLICT = 5


class ModelNotFound(NotFound):
    """A model that does not exist or is disabled, worded as OpenAI words it."""

    code = "model_not_found"

    def __init__(self, model_id: str, *, param: str | None = "model") -> None:
        super().__init__("model", model_id, param=param)
        self.message = f"The model '{model_id}' does not exist or is not enabled."


class ModelService:
    """Create, change and list models; resolve the enabled ones clients may call."""

    def __init__(
        self,
        storage: Storage,
        *,
        on_change: Callable[[str | None], None] | None = None,
        bus: InvalidationBus | None = None,
        policy: OutboundPolicy | None = None,
    ) -> None:
        self._storage = storage
        # `parameters.base_url` is checked as webhook URLs are (OUTBOUND_ALLOWED_HOSTS).
        self._policy = policy or OutboundPolicy()
        # Told the id of every model that changed, so routes cached in memory are dropped.
        self._on_change = on_change or (lambda model_id: None)
        # Metering in every process caches prices (and an unknown model's zero price).
        self._bus = bus or InvalidationBus(None, shared=False)

    def _check_base_url(self, url: str | None) -> None:
        """A 400 naming the field for a URL at a forbidden literal address (names: at connect)."""
        if url is not None:
            self._policy.check_url(url, param="parameters.base_url")

    async def _priced(self, model_id: str) -> None:
        await self._bus.publish(METERING_TOPIC, f"model:{model_id}")

    async def create(self, data: ModelCreate) -> Model:
        """Register a model; its credential must exist and be for the same provider."""
        self._check_base_url(data.parameters.base_url)
        model = Model(
            id=data.id,
            name=data.name or data.id,
            description=data.description,
            kind=data.kind,
            provider=data.provider,
            provider_model=data.provider_model,
            credential_id=data.credential_id,
            parameters=data.parameters.as_dict(),
            context_window=data.context_window,
            input_price_per_million=data.input_price_per_million,
            output_price_per_million=data.output_price_per_million,
            enabled=data.enabled,
        )
        try:
            async with self._storage.unit_of_work() as uow:
                await self._check_credential(uow, model)
                if await uow.repo(ModelChain).get(model.id) is not None:
                    # Clients name chains and models in the same `model` field.
                    raise Conflict(
                        f"a chain named '{model.id}' exists; a model needs its own name",
                        param="id",
                    )
                await uow.repo(Model).add(model)
                uow.on_commit(lambda: self._on_change(model.id))
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"model '{data.id}' already exists", param="id") from exc
        await self._priced(model.id)
        log.info("model %s created (provider %s)", model.id, model.provider.value)
        return model

    async def get(self, model_id: str) -> Model:
        """The model `model_id`, enabled or not, or `NotFound`."""
        return await read_existing(self._storage, Model, model_id, "model")

    async def get_enabled(self, model_id: str, *, param: str | None = "model") -> Model:
        """The enabled model `model_id`; unknown or disabled is `ModelNotFound` (no fallback)."""
        async with self._storage.unit_of_work() as uow:
            model = await uow.repo(Model).get(model_id)
        if model is None or not model.enabled:
            raise ModelNotFound(model_id, param=param)
        return model

    async def list(
        self,
        *,
        provider: Provider | None = None,
        enabled: bool | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> Page[Model]:
        """Models ordered by id, a page at a time."""
        where = given(Where.eq("provider", provider), Where.eq("enabled", enabled))
        return await read_page(
            self._storage, Model, *where, order_by=["id"], limit=limit, after=after
        )

    async def list_callable(self) -> builtins.list[Model | ModelChain]:
        """Every name a call may give in `model`, ordered by id (what `/v1/models` lists): the
        enabled models, and the enabled chains with an enabled model among their steps."""
        async with self._storage.unit_of_work() as uow:
            models = await uow.repo(Model).find(
                Where.eq("enabled", True), order_by=["id"], limit=_LISTED_MAX
            )
            chains = await uow.repo(ModelChain).find(
                Where.eq("enabled", True), order_by=["id"], limit=_LISTED_MAX
            )
        enabled = {m.id for m in models.items}
        # A model answers to its name before a chain does (`ChatService.resolve`): one entry.
        callable_chains = [
            c for c in chains.items if c.id not in enabled and _routes_somewhere(c, enabled)
        ]
        return sorted([*models.items, *callable_chains], key=lambda named: named.id)

    async def get_callable(self, name: str, *, param: str | None = "model") -> Model | ModelChain:
        """The enabled model or callable chain `name`; anything else is `ModelNotFound`."""
        async with self._storage.unit_of_work() as uow:
            model = await uow.repo(Model).get(name)
            if model is not None:
                if not model.enabled:
                    raise ModelNotFound(name, param=param)
                return model
            chain = await uow.repo(ModelChain).get(name)
            if chain is None or not chain.enabled:
                raise ModelNotFound(name, param=param)
            ids = [str(step.get("model_id")) for step in chain.steps]
            enabled = {m.id for m in await uow.repo(Model).get_many(ids) if m.enabled}
        if not _routes_somewhere(chain, enabled):
            raise ModelNotFound(name, param=param)
        return chain

    async def update(self, model_id: str, changes: ModelUpdate) -> Model:
        """Apply the fields given; `config_version` moves when the answers could change."""
        values = changes.model_dump(exclude_unset=True, exclude={"parameters"})
        if changes.parameters is not None:
            self._check_base_url(changes.parameters.base_url)
            values["parameters"] = changes.parameters.as_dict()
        async with self._storage.unit_of_work() as uow:
            repo = uow.repo(Model)
            model = await get_existing(repo, model_id, "model")
            changed = {n for n, v in values.items() if getattr(model, n) != v}
            for name in changed:
                setattr(model, name, values[name])
            if changed & {"provider", "credential_id"}:
                await self._check_credential(uow, model)
            if changed & set(ANSWER_FIELDS):
                model.config_version += 1
            model.updated_at = utcnow()
            model = await repo.update(model)
            uow.on_commit(lambda: self._on_change(model_id))
            await uow.commit()
        await self._priced(model_id)
        log.info("model %s updated (%s)", model_id, ", ".join(sorted(changed)) or "no change")
        return model

    async def delete(self, model_id: str) -> None:
        """Delete a model (refused with `Conflict` while something still refers to it)."""
        async with self._storage.unit_of_work() as uow:
            chains = await uow.repo(ModelChain).find(order_by=["id"])
            users = [
                c.id for c in chains.items if any(s.get("model_id") == model_id for s in c.steps)
            ]
            if users:
                shown = ", ".join(f"'{c}'" for c in users[:_SHOWN_IN_CONFLICT])
                raise Conflict(
                    f"model '{model_id}' is a step of chain(s) {shown}: change them first",
                    param="id",
                )
            await delete_existing(uow.repo(Model), model_id, "model")
            uow.on_commit(lambda: self._on_change(model_id))
            await uow.commit()
        await self._priced(model_id)
        log.info("model %s deleted", model_id)

    async def calling_through(
        self, uow: UnitOfWork, credential_id: str, *, limit: int
    ) -> builtins.list[str]:
        """The ids of (at most `limit`) models calling with the credential, in id order (the
        credential's `CredentialUsers`: a credential in use is not deleted)."""
        page = await uow.repo(Model).find(
            Where.eq("credential_id", credential_id), order_by=["id"], limit=limit
        )
        return [model.id for model in page.items]

    async def credential_moved(self, uow: UnitOfWork, credential_id: str) -> None:
        """Move the config_version of every model calling through the credential, which now
        sends requests elsewhere: their cached answers must not be reused."""
        models = uow.repo(Model)
        after: str | None = None
        while True:
            page = await models.find(
                Where.eq("credential_id", credential_id), order_by=["id"], limit=100, after=after
            )
            for model in page.items:
                model.config_version += 1
                model.updated_at = utcnow()
                await models.update(model)
            if page.next_cursor is None:
                return
            after = page.next_cursor

    @staticmethod
    async def _check_credential(uow: UnitOfWork, model: Model) -> None:
        if model.credential_id is None:
            if model.provider is not Provider.MOCK:
                raise InvalidInput(
                    f"a model of provider '{model.provider.value}' needs a credential_id",
                    param="credential_id",
                )
            return
        credential = await uow.repo(StoredCredential).get(model.credential_id)
        if credential is None:
            raise InvalidInput(
                f"credential '{model.credential_id}' does not exist", param="credential_id"
            )
        if credential.provider != model.provider:
            raise InvalidInput(
                f"credential '{credential.id}' is for provider '{credential.provider.value}', "
                f"not '{model.provider.value}'",
                param="credential_id",
            )


def _routes_somewhere(chain: ModelChain, enabled_models: set[str]) -> bool:
    """Whether a call to `chain` reaches a model (disabled steps drop out of a chain)."""
    return chain.enabled and any(str(s.get("model_id")) in enabled_models for s in chain.steps)
