"""`/admin/credentials`: manage provider credentials and test them; secrets go in, never out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.access.deps import AdminDep
from app.core.provide import provide
from app.core.schemas import Deleted, PageAfter, PageLimit
from app.credentials.entities import Provider
from app.credentials.schemas import (
    ConnectionTestRead,
    CredentialCreate,
    CredentialList,
    CredentialRead,
    CredentialUpdate,
)
from app.credentials.service import CredentialService

admin_router = APIRouter(prefix="/admin/credentials", tags=["admin: credentials"])

CredentialsDep = Annotated[CredentialService, Depends(provide(CredentialService))]


@admin_router.post("", response_model=CredentialRead, status_code=201)
async def create_credential(
    body: CredentialCreate, admin: AdminDep, credentials: CredentialsDep
) -> CredentialRead:
    """Store a credential; its secret is encrypted and never shown again."""
    return CredentialRead.of(await credentials.create(body))


@admin_router.get("", response_model=CredentialList)
async def list_credentials(
    admin: AdminDep,
    credentials: CredentialsDep,
    provider: Provider | None = None,
    limit: PageLimit = 20,
    after: PageAfter = None,
) -> CredentialList:
    """Credentials ordered by id."""
    page = await credentials.list(provider=provider, limit=limit, after=after)
    return CredentialList.of(page, CredentialRead.of)


@admin_router.get("/{credential_id}", response_model=CredentialRead)
async def get_credential(
    credential_id: str, admin: AdminDep, credentials: CredentialsDep
) -> CredentialRead:
    """One credential (whether it has a secret, never the secret)."""
    return CredentialRead.of(await credentials.get(credential_id))


@admin_router.patch("/{credential_id}", response_model=CredentialRead)
async def update_credential(
    credential_id: str, body: CredentialUpdate, admin: AdminDep, credentials: CredentialsDep
) -> CredentialRead:
    """Change a credential; a field sent as null is cleared, a field left out is kept."""
    return CredentialRead.of(await credentials.update(credential_id, body))


@admin_router.delete(
    "/{credential_id}",
    response_model=Deleted,
    responses={409: {"description": "A model still uses the credential"}},
)
async def delete_credential(
    credential_id: str, admin: AdminDep, credentials: CredentialsDep
) -> Deleted:
    """Delete a credential that no model uses."""
    await credentials.delete(credential_id)
    return Deleted(id=credential_id, object="credential")


@admin_router.post("/{credential_id}/test", response_model=ConnectionTestRead)
async def test_credential(
    credential_id: str, admin: AdminDep, credentials: CredentialsDep
) -> ConnectionTestRead:
    """Call the provider's model list with the credential and report how it went."""
    result = await credentials.test(credential_id)
    return ConnectionTestRead(
        ok=result.ok,
        status_code=result.status_code,
        latency_ms=result.latency_ms,
        error=result.error,
    )
