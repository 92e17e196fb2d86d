"""The examples as a user runs them: subprocesses against a real gateway and replica."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
_LINE = re.compile(r"^(step|query) (\d+): (\d+) prompt tokens, (\d+) cached", re.MULTILINE)


def run_example(name: str, *args: str) -> tuple[str, list[tuple[int, int, int]]]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [(int(n), int(prompt), int(cached)) for _, n, prompt, cached in _LINE.findall(result.stdout)]
    return result.stdout, rows


def test_agent_example_reuses_the_prefix_on_every_step(gateway_url: str) -> None:
    out, steps = run_example("react_agent.py", "--base-url", gateway_url, "--steps", "6")
    assert [n for n, _, _ in steps] == [1, 2, 3, 4, 5, 6], out
    assert "cached >= 80% of the prompt on every step after the first: yes" in out, out
    assert all(cached >= 0.8 * prompt for _, prompt, cached in steps[1:]), out
    assert steps[0][1] > 400  # instructions, tool schemas and the task
    # Every step but the last called a tool, and the results went back into the conversation.
    assert len(re.findall(r"^  (calculator|lookup)\(", out, re.MULTILINE)) == 5, out
    assert all(b[1] > a[1] for a, b in itertools.pairwise(steps)), out


def test_rag_example_reuses_the_shared_instructions(gateway_url: str) -> None:
    out, queries = run_example("rag_pipeline.py", "--base-url", gateway_url, "--max-tokens", "4")
    assert [n for n, _, _ in queries] == [1, 2, 3, 4, 5, 6], out
    # The instructions (~250 tokens) are cached for every query after the first; the
    # queries that retrieve the same two documents as an earlier one reuse nearly all of it.
    assert all(cached >= 200 for _, _, cached in queries[1:]), out
    assert all(cached >= 0.8 * prompt for n, prompt, cached in queries if n in (3, 5, 6)), out
    assert "cached share of the prompt after the first query: mean" in out
