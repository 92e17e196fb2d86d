"""Wire types of the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models).

Requests decode strictly by type (a string where a number belongs is a 400) but unknown
fields are ignored, as OpenAI clients send fields this server has no use for. Range checks
live in SamplingParams and engine/server/openai_inputs.py, not here, so every message a user
sees comes from one place.
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import UNSET, Struct, UnsetType

from engine.server.protocol import ErrorBody

# --- requests ---------------------------------------------------------------------------

# The sampler divides positive logits by the penalty: near 0 they overflow float32 and the
# logprobs turn NaN (null in JSON, and a frame the gateway cannot decode). 0.01 already
# multiplies a logit by 100, far past any useful setting. Checked in openai_inputs.py.
MIN_REPETITION_PENALTY = 0.01


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(Struct, kw_only=True):
    """Fields common to both generation endpoints (OpenAI's and vLLM's extra ones)."""

    model: str | None = None
    max_tokens: int | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    user: str | None = None
    cache_salt: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class FunctionCallParam(Struct, kw_only=True):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; some clients an object


class ToolCallParam(Struct, kw_only=True):
    """A tool call of an earlier assistant turn, as the client sends the conversation back."""

    function: FunctionCallParam
    id: str | None = None
    type: str = "function"


class ChatMessage(Struct, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallParam] | None = None


class FunctionDefinition(Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolDefinition(Struct, kw_only=True):
    function: FunctionDefinition
    type: str = "function"


class ToolChoiceFunction(Struct, kw_only=True):
    name: str


class NamedToolChoice(Struct, kw_only=True):
    function: ToolChoiceFunction
    type: str = "function"


class JsonSchemaFormat(Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    type: str  # "text", "json_object" or "json_schema"
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = None
    tool_choice: str | NamedToolChoice | None = None  # "none", "auto", "required" or a named function
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids:
    # msgspec cannot tell list shapes apart in a union, openai_inputs.py does.
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


# --- responses --------------------------------------------------------------------------


class PromptTokensDetails(Struct):
    cached_tokens: int


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionCall(Struct):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: str = "function"


class AssistantMessage(Struct):
    content: str | None
    role: str = "assistant"
    # UNSET is left out of the JSON, as OpenAI leaves the key out when no tool was called.
    tool_calls: list[ToolCall] | UnsetType = UNSET


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    """A streamed tool call: the first delta has id, type, name and arguments "", later ones
    carry argument fragments; the client joins them by index."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class ChatDelta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "prefixgate"
    max_model_len: int


class ModelList(Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class ErrorResponse(Struct):
    error: ErrorBody


class PromptError(ValueError):
    """A prompt the tokenizer cannot turn into token ids; the message is meant for the user."""


class UnsupportedContentError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI chat messages as a chat template takes them (the replica and gateway alike).

    Text parts are joined; any other part raises UnsupportedContentError naming the field.
    """
    rendered = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise UnsupportedContentError(
                        f"only text content parts are supported, got {part.type!r}", f"messages[{i}].content"
                    )
                parts.append(part.text)
            content = "".join(parts)
        # OpenAI's newer "developer" role is what chat templates call "system".
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": content or ""})
    return rendered
