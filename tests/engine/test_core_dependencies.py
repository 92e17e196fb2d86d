"""The engine core runs with only torch, transformers, safetensors, xxhash and sortedcontainers
(DESIGN.md): a GPU machine may have none of the web stack, and a step must still run there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WEB_STACK = ("litestar", "msgspec", "uvicorn", "opentelemetry", "prometheus_client", "aiohttp", "httptools")

SCRIPT = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # importing it now raises ImportError
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.weights import load_model
core = EngineCore(EngineConfig(model={folder!r}, device="cpu", num_blocks=64), load_model({folder!r}))
request = core.add_request(list(range(3, 40)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
while core.has_unfinished:
    core.step()
assert len(request.output_token_ids) == 4
loaded = sorted(n for n in sys.modules if n.split(".")[0] in {blocked!r} and sys.modules[n] is not None)
assert not loaded, loaded
print("ok")
"""


def test_engine_core_imports_and_steps_without_the_web_stack(tiny_model_dir) -> None:
    folder: Path = tiny_model_dir("llama")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=WEB_STACK, folder=str(folder))],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
