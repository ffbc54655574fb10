"""Chat completion, embedding and chain requests and responses in the OpenAI wire format."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from app.core.errors import InvalidInput
from app.core.jsonvalues import unencodable

# Far above any model's output limit, and below what token arithmetic and budgets can hold.
MAX_TOKENS = 1_000_000

FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# A model or chain name: no control characters, which no id can hold (PostgreSQL refuses NUL).
ModelName = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class ChatMessage(BaseModel):
    """One message of a conversation (or a reference to a stored prompt, with `prompt_id`)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if not self.content:
            return ""
        return " ".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: ToolChoiceFunction


def _one_tool_choice(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # One error naming `tool_choice`, rather than one per member of the union (whose names
    # would end up in the error's `param`).
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "invalid_tool_choice",
            'must be "none", "auto", "required" or {"type": "function", "function": '
            '{"name": "<a function of tools>"}}',
        ) from None


ToolChoice = Annotated[
    Literal["none", "auto", "required"] | NamedToolChoice, WrapValidator(_one_tool_choice)
]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool | None = None


LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]]


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions` with OpenAI's parameter ranges."""

    # Parameters we do not know are passed on to OpenAI-compatible upstreams unchanged.
    model_config = ConfigDict(extra="allow")

    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1)
    # `allow_inf_nan=False`: Python's JSON parser reads 1e309 as infinity, and NaN as itself.
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None

    def check(self) -> dict[str, Any]:
        """Rules that span several fields; each failure names the field to fix.

        Returns the request as OpenAI JSON (`None`s left out), a dict the caller owns: the
        range check needs it, and so does whatever the request becomes next.
        """
        dumped = _encodable_dump(self)
        if self.stream_options is not None and not self.stream:
            raise InvalidInput(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInput("top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise InvalidInput("tool_choice requires tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            name = self.tool_choice.function.name
            if all(tool.function.name != name for tool in self.tools):
                raise InvalidInput(
                    f"tool_choice names the function '{name}', which is not among the tools",
                    param="tool_choice",
                )
        if (
            self.response_format is not None
            and self.response_format.type == "json_schema"
            and self.response_format.json_schema is None
        ):
            raise InvalidInput(
                "response_format of type json_schema requires json_schema",
                param="response_format.json_schema",
            )
        if isinstance(self.stop, list) and (len(self.stop) > 4 or any(not s for s in self.stop)):
            raise InvalidInput("stop takes up to 4 non-empty sequences", param="stop")
        return dumped

    def wants_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def has_prompt_references(self) -> bool:
        # `prompt_id` is an extra field: reading the dict avoids a failing getattr per message.
        return any((m.model_extra or {}).get("prompt_id") for m in self.messages)


def _encodable_dump(request: BaseModel) -> dict[str, Any]:
    """The request as OpenAI JSON (`None`s left out), refused when a value in it, extra
    parameters included, is text or a number that cannot go on (see `unencodable`)."""
    dumped = request.model_dump(by_alias=True, exclude_none=True)
    found = unencodable(dumped)
    if found is not None:
        field, reason = found
        raise InvalidInput(f"{field}: {reason}", param=field)
    return dumped


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`."""

    model: ModelName
    # Emptiness is judged in `check`: constraints here would name a member of the union
    # (`input.constrained-str`) rather than the field in errors.
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=8192)
    user: str | None = Field(default=None, max_length=256)

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check(self) -> dict[str, Any]:
        """What the schema cannot say; returns the request as OpenAI JSON, as
        `ChatCompletionRequest.check` does."""
        if self.input == "" or self.input == []:
            raise InvalidInput("input must not be empty", param="input")
        if isinstance(self.input, list):
            for index, text in enumerate(self.input):
                if not text:
                    raise InvalidInput(
                        f"input.{index}: the inputs must not be empty", param=f"input.{index}"
                    )
        return _encodable_dump(self)


class OperationAccepted(BaseModel):
    """The answer to a request accepted as a job."""

    operation_id: str
    status: str
    object: Literal["operation"] = "operation"


class ChainStep(BaseModel):
    """One step of a chain: a model, how often to retry it, and when to give up waiting."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1, max_length=64)
    max_retries: int = Field(default=0, ge=0, le=10)
    backoff_ms: int = Field(default=200, ge=0, le=60_000)
    # Past this, the step is abandoned for the next one (ignored on the last step).
    latency_threshold_ms: int | None = Field(default=None, ge=1, le=600_000)


ChainId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


class ChainCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: ChainId
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    steps: list[ChainStep] = Field(min_length=1, max_length=10)
    enabled: bool = True


class ChainUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = None
    steps: list[ChainStep] | None = Field(default=None, min_length=1, max_length=10)
    enabled: bool | None = None


class ChainRead(BaseModel):
    id: str
    object: Literal["model_chain"] = "model_chain"
    name: str
    description: str | None
    steps: list[ChainStep]
    enabled: bool
    created_at: int
    updated_at: int


class ChainList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ChainRead]
