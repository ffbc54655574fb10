"""Workflows and external APIs: definitions checked and versioned on save, and runs submitted as
`workflow_run` jobs (in a worker, or in this process for a synchronous call)."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import socket
from typing import Any

from pydantic import ValidationError

from app.access.permissions import Resource
from app.access.service import Principal
from app.core.clock import utcnow
from app.core.errors import Conflict, DomainError, DuplicateKey, InvalidInput, NotFound
from app.core.events import EventSink
from app.core.ids import new_id
from app.core.outbound import OutboundPolicy
from app.credentials.entities import Provider, StoredCredential
from app.gateway.schemas import ResponseFormat
from app.models.entities import Model, ModelChain
from app.operations.entities import Operation
from app.operations.runner import JobTimings, OperationRunner
from app.operations.service import OperationService
from app.operations.submit import Owner
from app.operations.transitions import TERMINAL
from app.prompts.entities import Prompt
from app.queue.names import OperationKind
from app.queue.port import JobQueue
from app.storage.protocol import Page, Storage, UnitOfWork, Where
from app.storage.reads import delete_existing, get_existing, read_existing, read_page
from app.workflows.definition import ChatCompletionStep, HttpRequestStep, Step, parse_steps
from app.workflows.engine import WorkflowEngine, summary
from app.workflows.entities import ExternalApi, Workflow, WorkflowStepRun, WorkflowVersion
from app.workflows.jobs import workflow_handlers
from app.workflows.schema_check import check_schema, check_value
from app.workflows.schemas import (
    ExternalApiCreate,
    ExternalApiUpdate,
    WorkflowClone,
    WorkflowCreate,
    WorkflowUpdate,
)
from app.workflows.validation import Needed, check_references_exist, check_structure, walk

log = logging.getLogger(__name__)

# Credentials whose secret an external API may send: the ones made for that.
API_CREDENTIALS = frozenset({Provider.HTTP_API_KEY, Provider.CUSTOM})


class ExternalApiService:
    """The HTTP APIs `http_request` steps call; base URLs checked by the outbound policy."""

    def __init__(self, storage: Storage, policy: OutboundPolicy) -> None:
        self._storage = storage
        self._policy = policy

    async def create(self, data: ExternalApiCreate) -> ExternalApi:
        """Store an external API whose base URL the gateway may call."""
        self._policy.check_url(data.base_url, param="base_url")
        api = ExternalApi(**data.model_dump())
        try:
            async with self._storage.unit_of_work() as uow:
                await self._check_credential(uow, data.credential_id)
                await uow.repo(ExternalApi).add(api)
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"external API '{data.id}' already exists", param="id") from exc
        log.info("external API %s created", api.id)
        return api

    async def get(self, api_id: str) -> ExternalApi:
        return await read_existing(self._storage, ExternalApi, api_id, "external API")

    async def list(self, *, limit: int = 20, after: str | None = None) -> Page[ExternalApi]:
        """External APIs ordered by id."""
        return await read_page(
            self._storage, ExternalApi, order_by=["id"], limit=limit, after=after
        )

    async def update(self, api_id: str, changes: ExternalApiUpdate) -> ExternalApi:
        """Apply the fields given; a new base URL is checked as on create."""
        values = changes.model_dump(exclude_unset=True)
        if changes.base_url is not None:
            self._policy.check_url(changes.base_url, param="base_url")
        async with self._storage.unit_of_work() as uow:
            api = await get_existing(uow.repo(ExternalApi), api_id, "external API")
            if values.get("credential_id") is not None:
                await self._check_credential(uow, values["credential_id"])
            for name, value in values.items():
                setattr(api, name, value)
            api.updated_at = utcnow()
            api = await uow.repo(ExternalApi).update(api)
            await uow.commit()
        return api

    async def delete(self, api_id: str) -> None:
        """Delete an external API no workflow's current version calls (else a `Conflict`)."""
        async with self._storage.unit_of_work() as uow:
            await get_existing(uow.repo(ExternalApi), api_id, "external API")
            using = await _workflows_calling(uow, api_id)
            if using:
                raise Conflict(
                    f"external API '{api_id}' is called by workflow(s) {', '.join(using[:5])}"
                )
            await delete_existing(uow.repo(ExternalApi), api_id, "external API")
            await uow.commit()

    @staticmethod
    async def _check_credential(uow: UnitOfWork, credential_id: str | None) -> None:
        if credential_id is None:
            return
        credential = await uow.repo(StoredCredential).get(credential_id)
        if credential is None:
            raise InvalidInput(f"credential '{credential_id}' not found", param="credential_id")
        if credential.provider not in API_CREDENTIALS:
            raise InvalidInput(
                f"credential '{credential_id}' is a {credential.provider.value} credential; an "
                "external API takes an http_api_key or custom one",
                param="credential_id",
            )


async def _workflows_calling(uow: UnitOfWork, api_id: str) -> builtins.list[str]:
    workflows = await uow.repo(Workflow).find(order_by=["id"])
    using = []
    for workflow in workflows.items:
        try:
            steps = parse_steps(workflow.steps)
        except InvalidInput:
            continue
        if any(
            isinstance(p.step, HttpRequestStep) and p.step.external_api_id == api_id
            for p in walk(steps)
        ):
            using.append(workflow.id)
    return using


class WorkflowService:
    """Workflow definitions (checked, versioned) and their runs."""

    def __init__(
        self,
        storage: Storage,
        queue: JobQueue,
        operations: OperationService,
        engine: WorkflowEngine,
        *,
        timings: JobTimings | None = None,
        events: EventSink | None = None,
        sync_timeout: float = 30.0,
        max_wait: float = 30.0,
    ) -> None:
        self._storage = storage
        self._operations = operations
        self._engine = engine
        self.sync_timeout = sync_timeout
        self.max_wait = max_wait
        # Synchronous runs are claimed and run here, through the engine workers use; one this
        # process cannot finish (it stops) is recovered by the sweeper and resumed by a worker.
        self._local = OperationRunner(
            storage,
            queue,
            workflow_handlers(engine),
            worker_id=f"api-{socket.gethostname()}-{os.getpid()}",
            timings=timings,
            events=events,
        )
        self._running: set[asyncio.Task[bool]] = set()

    # ---- definitions -------------------------------------------------------------------------

    async def create(self, data: WorkflowCreate) -> Workflow:
        """Check and store a workflow; its definition becomes version 1."""
        await self._check(data.steps, data.input_schema)
        workflow = Workflow(
            id=data.id,
            name=data.name,
            description=data.description,
            input_schema=data.input_schema,
            steps=data.steps,
            workflow_version=1,
            enabled=data.enabled,
        )
        try:
            async with self._storage.unit_of_work() as uow:
                await uow.repo(Workflow).add(workflow)
                await uow.repo(WorkflowVersion).add(self._version(workflow))
                await uow.commit()
        except DuplicateKey as exc:
            raise Conflict(f"workflow '{data.id}' already exists", param="id") from exc
        log.info("workflow %s created", workflow.id)
        return workflow

    async def get(self, workflow_id: str) -> Workflow:
        return await read_existing(self._storage, Workflow, workflow_id, "workflow")

    async def list(
        self, *, enabled: bool | None = None, limit: int = 20, after: str | None = None
    ) -> Page[Workflow]:
        """Workflows ordered by id."""
        where = [] if enabled is None else [Where.eq("enabled", enabled)]
        return await read_page(
            self._storage, Workflow, *where, order_by=["id"], limit=limit, after=after
        )

    async def update(self, workflow_id: str, changes: WorkflowUpdate) -> Workflow:
        """Apply the changes; new steps or input schema are checked and become a new version
        (runs already submitted keep the version they started with)."""
        values = changes.model_dump(exclude_unset=True)
        async with self._storage.unit_of_work() as uow:
            workflow = await get_existing(uow.repo(Workflow), workflow_id, "workflow")
            steps = values.get("steps", workflow.steps)
            schema = values.get("input_schema", workflow.input_schema)
            redefined = steps != workflow.steps or schema != workflow.input_schema
            if redefined:
                await self._check(steps, schema)
            for name, value in values.items():
                setattr(workflow, name, value)
            if redefined:
                workflow.workflow_version += 1
                await uow.repo(WorkflowVersion).add(self._version(workflow))
            workflow.updated_at = utcnow()
            workflow = await uow.repo(Workflow).update(workflow)
            await uow.commit()
        log.info("workflow %s updated, now at version %d", workflow_id, workflow.workflow_version)
        return workflow

    async def delete(self, workflow_id: str) -> None:
        """Delete a workflow and its kept versions (runs already submitted then fail)."""
        async with self._storage.unit_of_work() as uow:
            await delete_existing(uow.repo(Workflow), workflow_id, "workflow")
            await uow.commit()

    async def clone(self, workflow_id: str, data: WorkflowClone) -> Workflow:
        """A new workflow with this one's current definition, at version 1, enabled."""
        source = await self.get(workflow_id)
        return await self.create(
            WorkflowCreate(
                id=data.new_id,
                name=data.new_name or f"Copy of {source.name}"[:200],
                description=source.description,
                input_schema=source.input_schema,
                steps=source.steps,
            )
        )

    async def list_versions(
        self, workflow_id: str, *, limit: int = 20, after: str | None = None
    ) -> Page[WorkflowVersion]:
        """The kept versions of a workflow, newest first."""
        await self.get(workflow_id)
        return await read_page(
            self._storage,
            WorkflowVersion,
            Where.eq("workflow_id", workflow_id),
            order_by=["-workflow_version"],
            limit=limit,
            after=after,
        )

    async def get_version(self, workflow_id: str, number: int) -> WorkflowVersion:
        async with self._storage.unit_of_work() as uow:
            found = await uow.repo(WorkflowVersion).find(
                Where.eq("workflow_id", workflow_id), Where.eq("workflow_version", number), limit=1
            )
        if not found.items:
            raise NotFound("workflow version", f"{workflow_id} v{number}", param="version")
        return found.items[0]

    @staticmethod
    def _version(workflow: Workflow) -> WorkflowVersion:
        return WorkflowVersion(
            id=new_id("wv"),
            workflow_id=workflow.id,
            workflow_version=workflow.workflow_version,
            input_schema=workflow.input_schema,
            steps=workflow.steps,
        )

    async def _check(self, raw_steps: Any, input_schema: Any) -> builtins.list[Step]:
        """The definition's steps, or `InvalidInput` naming the step and field at fault."""
        steps = parse_steps(raw_steps)
        check_structure(steps)
        if input_schema is not None:
            check_schema(input_schema, param="input_schema")
        for placed in walk(steps):
            if placed.step.output_schema is not None:
                check_schema(placed.step.output_schema, param=f"{placed.param}.output_schema")
            step = placed.step
            if isinstance(step, ChatCompletionStep) and step.response_format is not None:
                try:
                    ResponseFormat.model_validate(step.response_format)
                except ValidationError as exc:
                    at = f"{placed.param}.response_format"
                    raise InvalidInput(f"{at}: {exc.errors()[0]['msg']}", param=at) from None
        await check_references_exist(steps, self._exists)
        return steps

    async def _exists(self, item: Needed) -> bool:
        if item.kind == "knowledge base":
            # Without knowledge bases wired in, the step fails when it runs, saying so.
            knowledge = self._engine.deps.knowledge
            return knowledge is None or await knowledge.exists(item.id)
        async with self._storage.unit_of_work() as uow:
            if item.kind == "model":
                return (
                    await uow.repo(Model).get(item.id) is not None
                    or await uow.repo(ModelChain).get(item.id) is not None
                )
            kinds: dict[str, Any] = {
                "prompt": Prompt,
                "external API": ExternalApi,
                "credential": StoredCredential,
            }
            return await uow.repo(kinds[item.kind]).get(item.id) is not None

    async def test(
        self,
        caller: Principal,
        workflow_id: str,
        run_input: Any,
        *,
        mocks: dict[str, Any],
        mock_all: bool,
    ) -> tuple[Workflow, Any, builtins.list[WorkflowStepRun], DomainError | None]:
        """A dry run of the workflow's current definition for `caller` (see
        `WorkflowEngine.dry_run`); steps named in `mocks` must exist."""
        workflow = await self.get(workflow_id)
        names = {p.step.name for p in walk(parse_steps(workflow.steps))}
        for name in mocks:
            if name not in names:
                raise InvalidInput(
                    f"no step '{name}' in workflow '{workflow_id}'", param=f"step_mocks.{name}"
                )
        if workflow.input_schema is not None:
            check_value(workflow.input_schema, run_input, param="input")
        output, records, error = await self._engine.dry_run(
            caller, workflow.steps, run_input, mocks=mocks, mock_all=mock_all
        )
        return workflow, output, records, error

    # ---- runs --------------------------------------------------------------------------------

    async def submit(
        self,
        principal: Principal,
        workflow_id: str,
        run_input: Any,
        *,
        idempotency_key: str | None = None,
        send: bool = True,
    ) -> tuple[Operation, bool]:
        """Accept a run of the workflow's current version as a `workflow_run` job, once its
        input matches the input schema; the job and whether this request created it."""
        principal.ensure_can_use(Resource.WORKFLOWS, workflow_id, param="workflow_id")
        workflow = await self.get(workflow_id)
        if not workflow.enabled:
            raise InvalidInput(f"workflow '{workflow_id}' is disabled", param="workflow_id")
        if workflow.input_schema is not None:
            check_value(workflow.input_schema, run_input, param="input")
        return await self._operations.submit(
            kind=OperationKind.WORKFLOW_RUN,
            input={
                "workflow_id": workflow.id,
                "workflow_version": workflow.workflow_version,
                "input": run_input,
            },
            owner=Owner(key_id=principal.key_id, team_id=principal.team_id),
            idempotency_key=idempotency_key,
            meta={"workflow_id": workflow.id, "workflow_version": workflow.workflow_version},
            send=send,
        )

    async def execute(
        self,
        principal: Principal,
        workflow_id: str,
        run_input: Any,
        *,
        run_async: bool,
        wait: float | None = None,
        idempotency_key: str | None = None,
    ) -> Operation:
        """Submit a run and, unless `run_async` without `wait`, wait for it: a synchronous run
        is executed in this process for up to `wait` (else WORKFLOW_SYNC_TIMEOUT_SECONDS)
        seconds and goes on after that; the job as it then stands."""
        operation, created = await self.submit(
            principal, workflow_id, run_input, idempotency_key=idempotency_key, send=run_async
        )
        owner = Owner(key_id=principal.key_id, team_id=principal.team_id)
        limit = min(self.sync_timeout if wait is None else wait, self.max_wait)
        if run_async:
            if not wait:
                return operation
            return await self._operations.wait(operation.id, owner=owner, timeout=limit)
        if created:
            task = asyncio.ensure_future(self._local.execute(operation.id))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            await asyncio.wait({task}, timeout=limit)
            return await self._operations.get(operation.id, owner=owner)
        return await self._operations.wait(operation.id, owner=owner, timeout=limit)

    async def steps(self, operation_id: str, *, owner: Owner) -> builtins.list[WorkflowStepRun]:
        """The step records of a run the owner may see, in the order they were recorded."""
        operation = await self._run(operation_id, owner)
        async with self._storage.unit_of_work() as uow:
            page = await uow.repo(WorkflowStepRun).find(
                Where.eq("operation_id", operation.id), order_by=["position"]
            )
        return page.items

    async def outcome(self, operation: Operation) -> dict[str, Any]:
        """A finished run as the synchronous call answers it: the result of a completed run,
        else the error and the steps recorded so far."""
        assert operation.status in TERMINAL
        if isinstance(operation.result, dict) and "steps" in operation.result:
            result: dict[str, Any] = dict(operation.result)
            error = None
        else:
            async with self._storage.unit_of_work() as uow:
                page = await uow.repo(WorkflowStepRun).find(
                    Where.eq("operation_id", operation.id), order_by=["position"]
                )
            result = summary(
                str(operation.input.get("workflow_id")),
                int(operation.input.get("workflow_version") or 0),
                None,
                page.items,
            )
            error = {"type": operation.error_type, "message": operation.error_message}
        return {
            **result,
            "operation_id": operation.id,
            "status": operation.status.value,
            "success": error is None,
            "error": error,
        }

    async def _run(self, operation_id: str, owner: Owner) -> Operation:
        operation = await self._operations.get(operation_id, owner=owner)
        if operation.kind != OperationKind.WORKFLOW_RUN:
            raise NotFound("workflow run", operation_id)
        return operation

    async def aclose(self) -> None:
        """Stop the synchronous runs still going here; their leases run out and a worker
        resumes each from its last recorded step."""
        for task in builtins.list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
