"""The whole schema: importing this registers every table in `SQLModel.metadata`."""

from __future__ import annotations

from app.access.entities import ApiKey, Team, TeamMember, User
from app.batches.entities import Batch, StoredFile
from app.credentials.entities import StoredCredential
from app.datasets.entities import Dataset, DatasetItem, DatasetVersion
from app.evals.entities import TestCase, TestCaseResult, TestRun, TestSuite, TestSuiteCase
from app.experiments.entities import (
    Experiment,
    ExperimentFeedbackChange,
    ExperimentRecord,
    ExperimentTotals,
    ExperimentUnit,
    ExperimentWatermark,
)
from app.knowledge.entities import (
    KnowledgeBase,
    KnowledgeChunk,
    KnowledgeDocument,
    KnowledgeSource,
)
from app.logs.entities import ExecutionLog
from app.models.entities import Model, ModelChain
from app.operations.entities import Operation
from app.prompts.entities import Prompt, PromptVersion
from app.settings.entities import AppConfiguration
from app.storage.entity import Entity
from app.usage.entities import Budget, UsageRecord, UsageRollup
from app.webhooks.entities import Webhook, WebhookDelivery
from app.workflows.entities import ExternalApi, Workflow, WorkflowStepRun, WorkflowVersion

# Every table entity, each after the tables it references.
ENTITIES: tuple[type[Entity], ...] = (
    Operation,
    User,
    Team,
    TeamMember,
    ApiKey,
    StoredCredential,
    Model,
    ModelChain,
    Prompt,
    PromptVersion,
    Workflow,
    WorkflowVersion,
    ExternalApi,
    WorkflowStepRun,
    KnowledgeBase,
    KnowledgeDocument,
    KnowledgeSource,
    KnowledgeChunk,
    AppConfiguration,
    ExecutionLog,
    UsageRecord,
    UsageRollup,
    Budget,
    Experiment,
    ExperimentRecord,
    ExperimentFeedbackChange,
    ExperimentTotals,
    ExperimentUnit,
    ExperimentWatermark,
    Dataset,
    DatasetVersion,
    DatasetItem,
    TestCase,
    TestSuite,
    TestSuiteCase,
    TestRun,
    TestCaseResult,
    Webhook,
    WebhookDelivery,
    StoredFile,
    Batch,
)
