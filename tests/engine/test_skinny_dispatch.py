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
    folding = SkinnyMatmul(kernel, max_rows=8, fold_silu=True)
    for layer in model.model.layers:
        layer.self_attn.o_proj.skinny = skinny
        layer.mlp.down_proj.skinny = folding
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


def test_a_down_projection_without_the_fold_gets_the_activated_rows(tiny_model_dir) -> None:
    model = load_model(tiny_model_dir("llama")).model
    tokens = torch.randint(3, 500, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = [t.clone() for t in PagedDriver(model).step([(0, tokens)])]
    calls: list[tuple[int, int, bool]] = []

    def kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
        calls.append((x.shape[0], x.shape[1], silu_mul))
        return F.linear(silu_and_mul_ref(x) if silu_mul else x, w, b)

    for layer in model.model.layers:
        layer.mlp.down_proj.skinny = SkinnyMatmul(kernel, max_rows=16)  # fold_silu off
    got = PagedDriver(model).step([(0, tokens)])
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    inner = model.config.intermediate_size
    assert calls == [(12, inner, False)] * len(model.model.layers)


def test_a_fused_qkv_kernel_takes_few_rows_and_writes_the_same_cache(tiny_model_dir) -> None:
    from engine.models.layers import FusedQkv
    from kernels.attention_ref import store_kv
    from kernels.elementwise_ref import rotary_ref

    model = load_model(tiny_model_dir("llama")).model
    tokens = torch.randint(3, 500, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    plain = PagedDriver(model)
    reference = [t.clone() for t in plain.step([(0, tokens[:20]), (1, tokens[:3])])]
    reference_decode = [t.clone() for t in plain.step([(0, [7]), (1, [9])])]
    calls: list[int] = []

    def kernel(x, weight, bias, positions, cos, sin, kv_cache, slot_mapping, heads, kv_heads):  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        head_dim = kv_cache.shape[-1]
        q, k, v = F.linear(x, weight, bias).split(
            [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1
        )
        q, k = rotary_ref(positions, q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), cos, sin)
        store_kv(k, v.view(-1, kv_heads, head_dim), kv_cache, slot_mapping)
        return q

    for layer in model.model.layers:
        layer.self_attn.fused_qkv = FusedQkv(kernel, max_rows=4)
    driver = PagedDriver(model)
    prefill = driver.step([(0, tokens[:20]), (1, tokens[:3])])  # 23 rows: the three separate steps
    assert calls == []
    decode = driver.step([(0, [7]), (1, [9])])  # two rows: the fused kernel, reading the stored prefix
    assert calls == [2] * len(model.model.layers)
    for got, want in zip([*prefill, *decode], [*reference, *reference_decode], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
