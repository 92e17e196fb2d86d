"""Tools and tool turns into the prompt, for the replica and the gateway alike (torch-free).

When the model's chat template knows tools (it mentions `tools`), the tools and the tool
turns go to the template as Hugging Face templates take them. Otherwise they are rendered
in the Hermes style: a `<tools>` block in the system prompt, earlier calls as `<tool_call>`
blocks in the assistant turn (written exactly as the forcing grammar makes the model write
them, so the next turn's prompt starts with the tokens this one generated), results as
`<tool_response>` blocks in a user turn. The rendering depends only on the tools and the
messages, never on tool_choice, and is byte-stable, so an agent's tool schemas stay a
cached prefix turn after turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from engine.server.openai_types import ChatMessage, template_messages
from engine.server.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Tool


def template_knows_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def template_inputs(
    messages: list[ChatMessage], tools: Sequence[Tool], template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template: native when it knows tools, else Hermes-style.

    A conversation without tools renders exactly as template_messages() makes it.
    Raises UnsupportedContentError (openai_types) for non-text content parts.
    """
    rendered: list[dict[str, Any]] = template_messages(messages)
    if template_knows_tools(template):
        for out, message in zip(rendered, messages, strict=True):
            if message.tool_calls:
                out["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": _arguments(call.function.arguments),
                        },
                    }
                    for call in message.tool_calls
                ]
            if message.role == "tool" and message.tool_call_id is not None:
                out["tool_call_id"] = message.tool_call_id
            if message.name is not None and message.role in ("tool", "function"):
                out["name"] = message.name
        return rendered, [tool.definition for tool in tools] or None
    return _hermes_messages(rendered, messages, tools), None


def _arguments(arguments: str | dict[str, Any]) -> Any:
    """Arguments as an object where they parse (templates print them with tojson)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def render_call(name: str, arguments: Any) -> str:
    """One call as the Hermes format writes it (and as the forcing grammar makes the model write it)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tools_system_block(tools: Sequence[Tool]) -> str:
    signatures = "\n".join(json.dumps(tool.definition, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\n"
        "You may call one or more functions to answer the user. The functions you can call are "
        "described by the JSON schemas inside <tools></tools>:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "To call a function, answer with a JSON object holding its name and arguments inside "
        "<tool_call></tool_call> tags, one block per call:\n"
        '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>'
    )


def _hermes_messages(
    rendered: list[dict[str, Any]], messages: list[ChatMessage], tools: Sequence[Tool]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    last_was_tool = False
    for message, base in zip(messages, rendered, strict=True):
        if message.role in ("tool", "function"):
            response = f"<tool_response>\n{base['content']}\n</tool_response>"
            if last_was_tool:  # consecutive results share one user turn
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
            last_was_tool = True
            continue
        last_was_tool = False
        if message.role == "assistant" and message.tool_calls:
            calls = [
                render_call(c.function.name, _arguments(c.function.arguments)) for c in message.tool_calls
            ]
            text = base["content"]
            base = {**base, "content": "\n".join([text, *calls] if text else calls)}
        out.append(base)
    if tools:
        block = tools_system_block(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out
