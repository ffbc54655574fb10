"""Prompts, their versions and labels as the admin API accepts and shows them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.ids import SLUG_MAX, is_slug
from app.core.schemas import ListPage, PartialUpdate, from_entity
from app.prompts.entities import Prompt, PromptVersion

LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,49}$"
LATEST = "latest"
PRODUCTION = "production"
MAX_CONTENT = 200_000

Label = Annotated[str, Field(pattern=LABEL_PATTERN)]
VariableValue = str | int | float | bool | None


def _slug(value: str) -> str:
    if not is_slug(value):
        raise ValueError(
            f"must be 1 to {SLUG_MAX} letters, digits and inner hyphens (e.g. 'support-reply')"
        )
    return value


class PromptCreate(BaseModel):
    """A new prompt; its content becomes version 1."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    content: str = Field(min_length=1, max_length=MAX_CONTENT)
    tags: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=50
    )
    output_schema: dict[str, Any] | None = None
    max_history: int = Field(default=10, ge=0, le=10_000, description="0 keeps every version")
    labels: list[Label] = Field(
        default_factory=list, max_length=20, description="Labels to put on version 1"
    )
    message: str | None = Field(default=None, max_length=1000, description="A note on version 1")
    enabled: bool = True

    _id = field_validator("id")(_slug)


class PromptUpdate(PartialUpdate):
    """Changes to a prompt; new content becomes a new version, and `labels` point at it."""

    clearable = frozenset({"description", "output_schema", "message", "labels"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    content: str | None = Field(default=None, min_length=1, max_length=MAX_CONTENT)
    tags: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        default=None, max_length=50
    )
    output_schema: dict[str, Any] | None = None
    max_history: int | None = Field(default=None, ge=0, le=10_000)
    labels: list[Label] | None = Field(default=None, max_length=20)
    message: str | None = Field(default=None, max_length=1000)
    enabled: bool | None = None


class VariableRead(BaseModel):
    name: str
    required: bool
    default: str | None


class PromptRead(BaseModel):
    """A prompt at its current version, with its labels and the variables it uses."""

    id: str
    object: Literal["prompt"] = "prompt"
    name: str
    description: str | None
    content: str
    current_version: int
    labels: dict[str, int]
    variables: list[VariableRead]
    tags: list[str]
    output_schema: dict[str, Any] | None
    max_history: int
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, prompt: Prompt) -> PromptRead:
        return from_entity(cls, prompt)


class PromptList(ListPage[PromptRead]):
    pass


class PromptVersionRead(BaseModel):
    """One immutable version of a prompt and the labels pointing at it."""

    prompt_id: str
    object: Literal["prompt.version"] = "prompt.version"
    version: int
    content: str
    message: str | None
    labels: list[str]
    created_at: datetime

    @classmethod
    def of(cls, version: PromptVersion, labels: dict[str, int]) -> PromptVersionRead:
        return cls(
            prompt_id=version.prompt_id,
            version=version.prompt_version,
            content=version.content,
            message=version.message,
            labels=sorted(n for n, v in labels.items() if v == version.prompt_version),
            created_at=version.created_at,
        )


class PromptVersionList(ListPage[PromptVersionRead]):
    pass


class LabelMove(BaseModel):
    """Where a label should point."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)


class RenderRequest(BaseModel):
    """Values for the variables, and which version to render (a label or a number)."""

    model_config = ConfigDict(extra="forbid")

    variables: dict[str, VariableValue] = Field(default_factory=dict)
    label: Label | None = None
    version: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_selector(self) -> Self:
        if self.label is not None and self.version is not None:
            raise ValueError("give either label or version, not both")
        return self


class RenderRead(BaseModel):
    prompt_id: str
    version: int
    rendered: str
