"""Which calls a projection's skinny-matmul kernel gets (engine/models/layers.py Linear, and the
MLP folding its activation into the down projection). The Triton kernel itself is tested on a
GPU (tests/kernels/test_triton_gemv.py); here a torch kernel of the same contract stands in for
it, so the routing runs in CI, on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.models.layers import SkinnyMatmul
from engine.weights import load_model
from kernels.elementwise_ref import silu_and_mul_ref
from testkit.paged import PagedDriver


def test_few_row_calls_take_the_kernel_and_outputs_do_not_change(tiny_model_dir) -> None:
    model = load_model(tiny_model_dir("llama")).model
    tokens = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    plain = PagedDriver(model)
    reference = [t.clone() for t in plain.step([(0, tokens[:30]), (1, tokens[:5])])]
    reference_decode = [t.clone() for t in plain.step([(0, [7]), (1, [9])])]
    calls: list[tuple[int, bool]] = []

    def kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
        calls.append((x.shape[0], silu_mul))
        return F.linear(silu_and_mul_ref(x) if silu_mul else x, w, b)

    skinny = SkinnyMatmul(kernel, max_rows=8)
    for layer in model.model.layers:
        layer.self_attn.o_proj.skinny = skinny
        layer.mlp.down_proj.skinny = skinny
    driver = PagedDriver(model)
    batch = driver.step([(0, tokens[:30]), (1, tokens[:5])])  # 35 rows: cuBLAS's
    assert calls == []
    for got, want in zip(batch, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    decode = driver.step([(0, [7]), (1, [9])])  # two decode rows: the kernel's, the activation folded in
    for got, want in zip(decode, reference_decode, strict=True):
        torch.testing.assert_close(got, want)
    layers = len(model.model.layers)
    assert calls.count((2, False)) == layers and calls.count((2, True)) == layers
