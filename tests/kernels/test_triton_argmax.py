"""The spread-out argmax against torch's, ties, -inf rows and NaN included."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import Sampler

pytestmark = pytest.mark.gpu
triton_argmax = pytest.importorskip("kernels.triton_argmax")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 7, 64])
@pytest.mark.parametrize("columns", [1, 5, 1023, 1024, 1025, 49152, 128256, 151936])
def test_argmax_matches_torch(dtype: torch.dtype, rows: int, columns: int) -> None:
    logits = (torch.randn(rows, columns, device="cuda") * 4).to(dtype)
    assert torch.equal(triton_argmax.argmax_triton(logits), logits.argmax(dim=-1))


def test_ties_go_to_the_first_index_across_chunks() -> None:
    logits = torch.zeros(3, 5000, device="cuda")
    logits[0, [4000, 1500, 1024, 3000]] = 2.0  # equal maxima in different chunks
    logits[1, [7, 8]] = 1.0  # equal maxima in one chunk
    logits[2] = float("-inf")  # nothing allowed: index 0, as torch gives
    out = triton_argmax.argmax_triton(logits)
    assert out.tolist() == [1024, 7, 0] == logits.argmax(dim=-1).tolist()


def test_nan_is_never_picked_and_the_index_stays_valid() -> None:
    logits = torch.randn(2, 3000, device="cuda")
    logits[0, 10] = float("nan")
    logits[1] = float("nan")
    out = triton_argmax.argmax_triton(logits)
    finite = logits[0].nan_to_num(nan=float("-inf"))
    assert out[0].item() == finite.argmax().item()
    assert out[1].item() == 0


def test_strided_and_empty_inputs() -> None:
    wide = torch.randn(4, 2000, device="cuda")
    assert torch.equal(triton_argmax.argmax_triton(wide[:, ::2]), wide[:, ::2].argmax(dim=-1))
    assert triton_argmax.argmax_triton(torch.empty(0, 10, device="cuda")).shape == (0,)
    with pytest.raises(ValueError):
        triton_argmax.argmax_triton(torch.empty(3, 0, device="cuda"))


def test_sampler_greedy_rows_take_the_kernel() -> None:
    # The engine's sampler on CUDA: greedy tokens equal torch's argmax of the same logits.
    from engine.sampler import SamplingInputs
    from engine.sampling_params import SamplingParams

    logits = torch.randn(5, 32000, device="cuda", dtype=torch.bfloat16)
    inputs = SamplingInputs.build(
        params=[SamplingParams(temperature=0.0)] * 5,
        generators=[None] * 5,
        prompt_token_ids=[()] * 5,
        output_token_ids=[()] * 5,
        vocab_size=32000,
        device=torch.device("cuda"),
    )
    out = Sampler(triton_argmax.argmax_triton)(logits, inputs)
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
