"""What a prefixgate gateway or replica answers, as the client reads it (msgspec Structs).

These are the client's own, not the server's wire types (engine/server/openai_types.py):
they import neither torch nor the web stack, every field a server may leave out has a
default, and unknown fields are ignored, so the same client reads any OpenAI-compatible
server (vLLM, SGLang) as well.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field

# --- usage ------------------------------------------------------------------------------


class PromptTokensDetails(Struct, kw_only=True):
    cached_tokens: int = 0


class Usage(Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV the server already held (0 when it does not say)."""
        details = self.prompt_tokens_details
        return details.cached_tokens if details is not None else 0

    @property
    def cached_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


# --- tool calls ---------------------------------------------------------------------------


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, exactly as the model wrote it


class ToolCall(Struct, kw_only=True, omit_defaults=True):
    id: str
    function: FunctionCall
    type: str = "function"


class FunctionCallDelta(Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta | None = None


# --- logprobs -----------------------------------------------------------------------------


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


# --- chat ---------------------------------------------------------------------------------


class AssistantMessage(Struct, kw_only=True, omit_defaults=True):
    """An assistant reply. `to_dict()` gives it back as a message to send next turn."""

    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    def to_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in self.tool_calls
            ]
        return message


class ChatChoice(Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(Struct, kw_only=True):
    id: str
    created: int = 0
    model: str = ""
    choices: list[ChatChoice]
    usage: Usage | None = None
    object: str = "chat.completion"

    @property
    def message(self) -> AssistantMessage:
        """The first choice's message (the only one unless n > 1)."""
        return self.choices[0].message

    @property
    def text(self) -> str:
        return self.choices[0].message.content or ""


class ChatDelta(Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Struct, kw_only=True):
    index: int = 0
    delta: ChatDelta = field(default_factory=ChatDelta)
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = []
    usage: Usage | None = None
    object: str = "chat.completion.chunk"

    @property
    def text(self) -> str:
        """The first choice's new text in this chunk ("" for a usage-only chunk)."""
        return (self.choices[0].delta.content or "") if self.choices else ""


# --- completions --------------------------------------------------------------------------


class CompletionChoice(Struct, kw_only=True):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(Struct, kw_only=True):
    """A whole completion, or one chunk of a streamed one (same shape, as in OpenAI's API)."""

    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: Usage | None = None
    object: str = "text_completion"

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


# --- models -------------------------------------------------------------------------------


class Model(Struct, kw_only=True):
    id: str
    created: int = 0
    owned_by: str = ""
    max_model_len: int | None = None
    object: str = "model"


class ModelList(Struct, kw_only=True):
    data: list[Model]
    object: str = "list"


class ErrorBody(Struct, kw_only=True):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class ErrorEnvelope(Struct, kw_only=True):
    error: ErrorBody
