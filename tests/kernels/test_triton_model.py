"""The tiny models end to end with the Triton backend: same greedy tokens, close logits."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.weights import load_model
from kernels.backend import TorchAttention, default_backend
from testkit.engine import mixed_workload, run_all
from testkit.numerics import relative_error
from testkit.paged import PagedDriver

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from kernels.backend import TritonAttention  # noqa: E402


def test_default_backend_is_triton_on_cuda_and_torch_on_cpu() -> None:
    assert isinstance(default_backend(torch.device("cuda")), TritonAttention)
    assert isinstance(default_backend(torch.device("cpu")), TorchAttention)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("budget", [4096, 16], ids=["whole-prompts", "chunked"])
def test_engine_greedy_outputs_equal_with_triton_and_torch_backends(
    tiny_model_dir, family: str, budget: int
) -> None:
    folder = tiny_model_dir(family)
    prompts, params = mixed_workload()
    outputs = []
    for backend in (TorchAttention(), TritonAttention()):
        config = EngineConfig(
            model=str(folder),
            device="cuda",
            dtype="float32",
            block_size=16,
            num_blocks=512,
            enable_prefix_caching=True,
            max_batched_tokens=budget,
        )
        loaded = load_model(folder, dtype=torch.float32, device="cuda", backend=backend)
        outputs.append(run_all(EngineCore(config, loaded), prompts, params))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_triton_logits_follow_float32_reference(tiny_model_dir, family: str) -> None:
    """Prefill, chunks on a cached prefix, then batched decodes (the split-KV decode kernel)."""
    folder = tiny_model_dir(family)
    gen = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (300, 181, 47)]
    cpu = load_model(folder).model
    references = [PagedDriver(cpu, block_size=16).step([(0, p)])[0] for p in prompts]
    gpu = PagedDriver(
        load_model(folder, dtype=torch.bfloat16, device="cuda", backend=TritonAttention()).model,
        num_blocks=64,
        block_size=16,
    )
    ours: list[list[torch.Tensor]] = [[] for _ in prompts]

    def step(work: list[tuple[int, list[int]]]) -> None:
        for (seq, _), logits in zip(work, gpu.step(work), strict=True):
            ours[seq].append(logits.float().cpu())

    # A whole prompt, prompts chunked over their cached prefixes, then one token at a time.
    step([(0, prompts[0][:200]), (1, prompts[1][:17])])
    step([(0, prompts[0][200:237]), (1, prompts[1][17:150]), (2, prompts[2][:1])])
    step([(0, prompts[0][237:250]), (1, prompts[1][150:160]), (2, prompts[2][1:30])])
    for pos in range(30, 47):
        step(
            [
                (0, prompts[0][220 + pos : 221 + pos]),
                (1, prompts[1][130 + pos : 131 + pos]),
                (2, prompts[2][pos : pos + 1]),
            ]
        )
    lengths = [267, 177, 47]
    for seq, reference in enumerate(references):
        got = torch.cat(ours[seq])
        assert got.shape[0] == lengths[seq]
        assert torch.isfinite(got).all()
        error = relative_error(got, reference[: lengths[seq]])
        assert error < 2e-2, f"sequence {seq}: relative error {error:.2e}"
