"""A ReAct-style agent with two tools (a calculator and a lookup over examples/docs/), printing
how much of each step's prompt was served from the prefix cache.

Each step sends the whole conversation so far: instructions, tool schemas, the task, and
every earlier tool call and result, exactly as they were (prefixgate.Session keeps them
byte-stable and sends one session id, so the gateway keeps the agent on the replica that
holds its KV). Only the newest tool result is new to the server, so from the second step on
nearly the whole prompt is cached.

It uses the OpenAI tools API (`tools`, `tool_choice`, `tool_calls`, `role: tool`). The
embedded 135M model seldom decides to call a tool by itself, so by default every step but
the last requires a tool call (`--tool-choice auto` lets the model decide) and the last
asks for the answer (tool_choice "none").

    prefixgate serve &                    # gateway on http://127.0.0.1:8080
    python examples/react_agent.py --steps 6
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import sys
from collections.abc import Callable
from typing import Any

from rag_pipeline import DOCS, load_documents, retrieve

from prefixgate import Client, PrefixgateError, Session

SYSTEM = """You are an operations agent for an online shop. Work step by step: think about
what you need, call one tool, read its result, and repeat until you can answer.
Tools:
- calculator: evaluates an arithmetic expression (numbers, + - * / ** and parentheses).
- lookup: returns the shop's policy document that best matches a topic (returns, shipping,
  warranty, loyalty programme, stores and support).
Rules: never guess a number you can compute or a policy you can look up; quote the
documents' figures exactly; answer in at most three sentences once you are done."""

TASK = (
    "A customer bought 3 kettles at 17.50 euros each and 2 mugs at 4.25 euros each. "
    "What is the order total, is shipping free for it, how many loyalty points does it earn, "
    "and how long can the customer return an opened kettle?"
)

FINAL_NUDGE = "That is enough tool use. Answer the task now in plain words, without calling a tool."

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression and return the number.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. 3 * 17.5 + 2 * 4.25"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Return the shop policy document that best matches a topic.",
            "parameters": {
                "type": "object",
                "properties": {"topic": {"type": "string", "description": "e.g. shipping costs"}},
                "required": ["topic"],
            },
        },
    },
]

_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculate(expression: str) -> float:
    """Arithmetic only: the expression's syntax tree is walked, never eval'd."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            if isinstance(node.op, ast.Pow) and abs(value(node.right)) > 100:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"unsupported expression: {ast.dump(node)[:60]}")

    return value(ast.parse(expression, mode="eval").body)


def run_tool(name: str, arguments: str) -> str:
    """A tool's result as the text the model reads next; errors too, so the agent can recover."""
    try:
        args = json.loads(arguments or "{}")
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
        if name == "calculator":
            result = calculate(str(args["expression"]))
            return f"{result:g}"
        if name == "lookup":
            [doc] = retrieve(load_documents(DOCS), str(args["topic"]), 1)
            return doc.text
        return f"error: unknown tool {name!r}"
    except (ValueError, KeyError, SyntaxError, ZeroDivisionError, OverflowError) as err:
        return f"error: {type(err).__name__}: {err}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8080", help="gateway or replica URL")
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--steps", type=int, default=6, help="requests at most; the last one asks for the answer"
    )
    parser.add_argument("--tool-choice", default="required", choices=["required", "auto"])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cache-salt", default=None)
    args = parser.parse_args(argv)

    with Client(args.base_url, model=args.model) as client:
        session = Session(
            client,
            system=SYSTEM,
            tools=TOOLS,
            parallel_tool_calls=False,  # one action per step, as ReAct takes them
            max_tokens=args.max_tokens,
            temperature=0,
            cache_salt=args.cache_salt,
        )
        session.add_user(TASK)
        print(f"task: {TASK}\nsession: {session.session_id}")
        for step in range(1, args.steps + 1):
            last = step == args.steps
            if last:
                session.add_user(FINAL_NUDGE)
            try:
                reply = session.send(tool_choice="none" if last else args.tool_choice)
            except PrefixgateError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            turn = session.turns[-1]
            print(
                f"step {step}: {turn.prompt_tokens} prompt tokens, {turn.cached_tokens} cached "
                f"({turn.cached_fraction:.0%})"
            )
            message = reply.message
            if reply.choices[0].finish_reason == "length":
                print(f"  (cut at --max-tokens {args.max_tokens})")
            if message.content and message.content.strip():
                print(f"  {'answer' if not message.tool_calls else 'thought'}: {message.content.strip()}")
            if not message.tool_calls:
                break
            for call in message.tool_calls:
                result = run_tool(call.function.name, call.function.arguments)
                session.add_tool_result(call.id, result, name=call.function.name)
                shown = result if len(result) < 80 else result[:77] + "..."
                print(f"  {call.function.name}({call.function.arguments}) -> {shown}")
    later = session.turns[1:]
    cached_ok = bool(later) and all(t.cached_fraction >= 0.8 for t in later)
    print(f"steps: {len(session.turns)}")
    print(f"cached >= 80% of the prompt on every step after the first: {'yes' if cached_ok else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
