"""Prompts: immutable numbered versions, movable labels, rendering, and chat-message expansion."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.core.clock import utcnow
from app.core.errors import Conflict, DuplicateKey, InvalidInput, NotFound
from app.core.ids import new_id
from app.prompts.entities import Prompt, PromptVersion
from app.prompts.schemas import LATEST, PRODUCTION, PromptCreate, PromptUpdate
from app.prompts.template import MissingVariables, TemplateSyntaxError, parse
from app.storage.protocol import Page, Storage, UnitOfWork, Where, given
from app.storage.reads import delete_existing, get_existing, read_page

log = logging.getLogger(__name__)

# The keys that turn a chat message into a reference to a stored prompt.
PROMPT_KEYS = ("prompt_id", "prompt_label", "prompt_version", "variables")


@dataclass(frozen=True)
class Rendered:
    prompt_id: str
    version: int
    text: str


def _not_found(message: str, *, param: str | None) -> NotFound:
    error = NotFound("prompt", "", param=param)
    error.message = message
    return error


def _as_text(value: object, *, param: str) -> str | None:
    """A variable's value as inserted into the text; None means "not given"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise InvalidInput("a variable's value must be a string, number or boolean", param=param)


def _values(variables: Mapping[str, object], *, param: str) -> dict[str, str]:
    values = {}
    for name, raw in variables.items():
        text = _as_text(raw, param=f"{param}.{name}")
        if text is not None:
            values[name] = text
    return values


def _variables_of(content: str) -> list[dict[str, Any]]:
    try:
        template = parse(content)
    except TemplateSyntaxError as exc:
        raise InvalidInput(str(exc), param="content") from exc
    return [v.as_dict() for v in template.variables]


class PromptService:
    """Create prompts, add versions, move labels, render, and expand prompt messages."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    async def create(self, data: PromptCreate) -> Prompt:
        """Store a prompt with its content as version 1 (labelled `latest` and as asked)."""
        labels = dict.fromkeys(data.labels, 1) | {LATEST: 1}
        prompt = Prompt(
            id=data.id,
            name=data.name or data.id,
            description=data.description,
            content=data.content,
            current_version=1,
            labels=labels,
            variables=_variables_of(data.content),
            tags=data.tags,
            output_schema=data.output_schema,
            max_history=data.max_history,
            enabled=data.enabled,
        )
        first = PromptVersion(
            id=new_id("pv"),
            prompt_id=data.id,
            prompt_version=1,
            content=data.content,
            message=data.message,
        )
        try:
            async with self._storage.unit_of_work() as uow:
                await uow.repo(Prompt).add(prompt)
                await uow.repo(PromptVersion).add(first)
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"prompt '{data.id}' already exists", param="id") from exc
        log.info("prompt %s created", prompt.id)
        return prompt

    async def get(self, prompt_id: str) -> Prompt:
        """The prompt `prompt_id` at its current version, or `NotFound`."""
        async with self._storage.unit_of_work() as uow:
            return await self._get(uow, prompt_id)

    async def list(
        self, *, enabled: bool | None = None, limit: int = 20, after: str | None = None
    ) -> Page[Prompt]:
        """Prompts ordered by id, a page at a time."""
        where = given(Where.eq("enabled", enabled))
        return await read_page(
            self._storage, Prompt, *where, order_by=["id"], limit=limit, after=after
        )

    async def update(self, prompt_id: str, changes: PromptUpdate) -> Prompt:
        """Apply the changes; different content becomes a new version, old ones never change."""
        fields = changes.model_dump(exclude_unset=True, exclude={"content", "labels", "message"})
        async with self._storage.unit_of_work() as uow:
            prompt = await self._get(uow, prompt_id)
            for name, value in fields.items():
                setattr(prompt, name, value)
            if changes.content is not None and changes.content != prompt.content:
                await self._add_version(uow, prompt, changes.content, changes.message)
            if changes.labels:
                prompt.labels = prompt.labels | dict.fromkeys(
                    changes.labels, prompt.current_version
                )
            prompt = await self._save(uow, prompt)
            await uow.commit()
        log.info("prompt %s updated, now at version %d", prompt_id, prompt.current_version)
        return prompt

    async def restore(self, prompt_id: str, version: int) -> Prompt:
        """Add a new version with the content of an older one."""
        async with self._storage.unit_of_work() as uow:
            prompt = await self._get(uow, prompt_id)
            old = await self._version(uow, prompt_id, version, param="version")
            await self._add_version(uow, prompt, old.content, f"Restored version {version}")
            prompt = await self._save(uow, prompt)
            await uow.commit()
        return prompt

    async def delete(self, prompt_id: str) -> None:
        """Delete a prompt and all its versions."""
        async with self._storage.unit_of_work() as uow:
            await delete_existing(uow.repo(Prompt), prompt_id, "prompt")
            await uow.commit()
        log.info("prompt %s deleted", prompt_id)

    async def list_versions(
        self, prompt_id: str, *, limit: int = 20, after: str | None = None
    ) -> tuple[Page[PromptVersion], dict[str, int]]:
        """The kept versions, newest first, and the prompt's labels."""
        async with self._storage.unit_of_work() as uow:
            prompt = await self._get(uow, prompt_id)
            page = await uow.repo(PromptVersion).find(
                Where.eq("prompt_id", prompt_id),
                order_by=["-prompt_version"],
                limit=limit,
                after=after,
            )
        return page, prompt.labels

    async def get_version(
        self, prompt_id: str, version: int
    ) -> tuple[PromptVersion, dict[str, int]]:
        """One kept version, and the prompt's labels."""
        async with self._storage.unit_of_work() as uow:
            prompt = await self._get(uow, prompt_id)
            return await self._version(uow, prompt_id, version, param=None), prompt.labels

    async def set_label(self, prompt_id: str, label: str, version: int) -> Prompt:
        """Point `label` at `version` (`latest` always follows the newest version)."""
        async with self._storage.unit_of_work() as uow:
            prompt = await self._get(uow, prompt_id)
            if label == LATEST and version != prompt.current_version:
                raise InvalidInput(
                    f"'{LATEST}' always points at the newest version ({prompt.current_version})",
                    param="label",
                )
            await self._version(uow, prompt_id, version, param="version")
            prompt.labels = prompt.labels | {label: version}
            prompt = await self._save(uow, prompt)
            await uow.commit()
        log.info("prompt %s: label %s now points at version %d", prompt_id, label, version)
        return prompt

    async def remove_label(self, prompt_id: str, label: str) -> Prompt:
        """Remove a label (the version it pointed at may then be pruned)."""
        async with self._storage.unit_of_work() as uow:
            prompt = await self._get(uow, prompt_id)
            if label == LATEST:
                raise InvalidInput(f"'{LATEST}' cannot be removed", param="label")
            if label not in prompt.labels:
                raise _not_found(f"prompt '{prompt_id}' has no label '{label}'", param="label")
            prompt.labels = {n: v for n, v in prompt.labels.items() if n != label}
            prompt = await self._save(uow, prompt)
            await uow.commit()
        return prompt

    async def render(
        self,
        prompt_id: str,
        variables: Mapping[str, object],
        *,
        label: str | None = None,
        version: int | None = None,
    ) -> Rendered:
        """The text of a version (by label, number, or `production` else the newest) with values.

        A required variable without a value is `InvalidInput` naming it.
        """
        async with self._storage.unit_of_work() as uow:
            prompt = await self._get(uow, prompt_id)
            number, content = await self._select(uow, prompt, label, version, param=None)
        values = _values(variables, param="variables")
        try:
            text = parse(content).render(values)
        except MissingVariables as exc:
            raise InvalidInput(
                f"{exc} for prompt '{prompt_id}' version {number}",
                param=f"variables.{exc.names[0]}",
            ) from exc
        return Rendered(prompt_id=prompt_id, version=number, text=text)

    async def expand_messages(
        self, messages: builtins.list[dict[str, Any]]
    ) -> builtins.list[dict[str, Any]]:
        """Chat messages with each prompt reference replaced by `{"role", "content"}` rendered.

        A reference is `{"role", "prompt_id", "prompt_label"?, "prompt_version"?, "variables"?}`;
        other messages pass unchanged. An unknown or disabled prompt, label or version is
        `NotFound` with param `messages`; a missing variable is `InvalidInput` naming it.
        """
        if not any(isinstance(m, dict) and "prompt_id" in m for m in messages):
            return messages
        expanded: builtins.list[dict[str, Any]] = []
        async with self._storage.unit_of_work() as uow:
            for index, message in enumerate(messages):
                if not isinstance(message, dict) or "prompt_id" not in message:
                    expanded.append(message)
                else:
                    expanded.append(await self._expand(uow, index, message))
        return expanded

    async def _expand(self, uow: UnitOfWork, index: int, message: dict[str, Any]) -> dict[str, Any]:
        where = f"messages.{index}"
        prompt_id = message["prompt_id"]
        label = message.get("prompt_label")
        version = message.get("prompt_version")
        variables = message.get("variables")
        variables = {} if variables is None else variables
        if not isinstance(prompt_id, str) or not prompt_id:
            raise InvalidInput("prompt_id must be a prompt's id", param=f"{where}.prompt_id")
        if "content" in message:
            raise InvalidInput(
                "a message gives either content or prompt_id, not both", param=f"{where}.content"
            )
        if label is not None and not isinstance(label, str):
            raise InvalidInput("prompt_label must be a string", param=f"{where}.prompt_label")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 1
        ):
            raise InvalidInput(
                "prompt_version must be a positive integer", param=f"{where}.prompt_version"
            )
        if label is not None and version is not None:
            raise InvalidInput(
                "give either prompt_label or prompt_version, not both",
                param=f"{where}.prompt_label",
            )
        if not isinstance(variables, dict):
            raise InvalidInput("variables must be an object", param=f"{where}.variables")
        prompt = await uow.repo(Prompt).get(prompt_id)
        if prompt is None or not prompt.enabled:
            raise _not_found(
                f"prompt '{prompt_id}' (in messages[{index}]) not found", param="messages"
            )
        number, content = await self._select(uow, prompt, label, version, param="messages")
        values = _values(variables, param=f"{where}.variables")
        try:
            text = parse(content).render(values)
        except MissingVariables as exc:
            raise InvalidInput(
                f"messages[{index}]: {exc} for prompt '{prompt_id}' version {number}",
                param=f"{where}.variables.{exc.names[0]}",
            ) from exc
        rest = {k: v for k, v in message.items() if k not in PROMPT_KEYS}
        return {**rest, "content": text}

    async def _select(
        self,
        uow: UnitOfWork,
        prompt: Prompt,
        label: str | None,
        version: int | None,
        *,
        param: str | None,
    ) -> tuple[int, str]:
        """The version number and content that a label or number (or neither) selects."""
        if version is None:
            if label is None:
                version = prompt.labels.get(PRODUCTION, prompt.current_version)
            elif label in prompt.labels:
                version = prompt.labels[label]
            else:
                raise _not_found(
                    f"prompt '{prompt.id}' has no label '{label}'", param=param or "label"
                )
        if version == prompt.current_version:
            return version, prompt.content  # the common case needs no second read
        stored = await self._version(uow, prompt.id, version, param=param or "version")
        return version, stored.content

    @staticmethod
    async def _get(uow: UnitOfWork, prompt_id: str) -> Prompt:
        return await get_existing(uow.repo(Prompt), prompt_id, "prompt")

    @staticmethod
    async def _version(
        uow: UnitOfWork, prompt_id: str, version: int, *, param: str | None
    ) -> PromptVersion:
        page = await uow.repo(PromptVersion).find(
            Where.eq("prompt_id", prompt_id), Where.eq("prompt_version", version), limit=1
        )
        if not page.items:
            raise _not_found(f"prompt '{prompt_id}' has no version {version}", param=param)
        return page.items[0]

    @staticmethod
    async def _add_version(
        uow: UnitOfWork, prompt: Prompt, content: str, message: str | None
    ) -> None:
        prompt.variables = _variables_of(content)
        prompt.content = content
        prompt.current_version += 1
        prompt.labels = prompt.labels | {LATEST: prompt.current_version}
        await uow.repo(PromptVersion).add(
            PromptVersion(
                id=new_id("pv"),
                prompt_id=prompt.id,
                prompt_version=prompt.current_version,
                content=content,
                message=message,
            )
        )

    async def _save(self, uow: UnitOfWork, prompt: Prompt) -> Prompt:
        """Write the prompt and prune versions beyond `max_history` that no label holds."""
        prompt.updated_at = utcnow()
        saved = await uow.repo(Prompt).update(prompt)
        if prompt.max_history > 0:
            repo = uow.repo(PromptVersion)
            kept = (
                await repo.find(Where.eq("prompt_id", prompt.id), order_by=["prompt_version"])
            ).items
            held = set(prompt.labels.values())
            excess = len(kept) - prompt.max_history
            for old in kept:
                if excess <= 0:
                    break
                if old.prompt_version not in held:
                    await repo.delete(old.id)
                    excess -= 1
        return saved
