"""What an API key may use: admin rights, and per kind of resource all, none or listed ids."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.errors import PermissionDenied


class Resource(StrEnum):
    MODELS = "models"
    PROMPTS = "prompts"
    WORKFLOWS = "workflows"
    KNOWLEDGE_BASES = "knowledge_bases"


_SINGULAR = {
    Resource.MODELS: "model",
    Resource.PROMPTS: "prompt",
    Resource.WORKFLOWS: "workflow",
    Resource.KNOWLEDGE_BASES: "knowledge base",
}

# "all", "none", or the ids the key may use.
Access = (
    Literal["all", "none"]
    | Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=1000)]
)


class KeyPermissions(BaseModel):
    """A key's permissions as stored in `api_keys.permissions` and shown by the admin API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    admin: bool = False
    models: Access = "all"
    prompts: Access = "all"
    workflows: Access = "all"
    knowledge_bases: Access = "all"

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> KeyPermissions:
        """The permissions of a stored key; a malformed document grants nothing but its name."""
        try:
            return cls.model_validate(stored)
        except ValidationError:
            # A key whose permissions cannot be read must not fall back to "all".
            return cls(models="none", prompts="none", workflows="none", knowledge_bases="none")

    def allows(self, resource: Resource | str, resource_id: str) -> bool:
        if self.admin:
            return True
        access = getattr(self, Resource(resource).value)
        if access == "all":
            return True
        if access == "none":
            return False
        return resource_id in access

    def ensure(self, resource: Resource | str, resource_id: str, *, param: str | None) -> None:
        if not self.allows(resource, resource_id):
            noun = _SINGULAR[Resource(resource)]
            raise PermissionDenied(
                f"this API key is not allowed to use the {noun} '{resource_id}'", param=param
            )
