"""A chat request to its output plan and prompt token ids, the same on the replica and the gateway.

Torch-free, so the gateway (which tokenizes with `tokenizers` + jinja) and the replica (which
uses the transformers tokenizer) share one path from messages to ids, and its 400s name the
same fields on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from engine.server.errors import bad_request
from engine.server.openai_types import ChatCompletionRequest, PromptError, UnsupportedContentError
from engine.server.response_format import ChatOutputPlan, chat_output_plan
from engine.server.tool_calls import RequestFieldError
from engine.server.tool_prompt import template_inputs


class ChatRenderer(Protocol):
    @property
    def chat_template(self) -> str | None: ...

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]: ...


def chat_plan(request: ChatCompletionRequest) -> ChatOutputPlan:
    """Tools to parse and the grammar to enforce (tools, tool_choice, response_format)."""
    try:
        return chat_output_plan(request)
    except RequestFieldError as err:
        raise bad_request(str(err), err.param) from None


def chat_prompt_ids(
    request: ChatCompletionRequest, renderer: ChatRenderer, plan: ChatOutputPlan
) -> list[int]:
    if not request.messages:
        raise bad_request("messages must not be empty", "messages")
    try:
        messages, tools = template_inputs(request.messages, plan.tools, renderer.chat_template)
    except UnsupportedContentError as err:
        raise bad_request(str(err), err.param) from None
    try:
        ids = renderer.apply_chat_template(
            messages, add_generation_prompt=request.add_generation_prompt, tools=tools
        )
    except PromptError as err:
        raise bad_request(str(err), "messages") from None
    if not ids:
        raise bad_request("the messages render to an empty prompt", "messages")
    return ids
