"""Our paged forward pass against Hugging Face transformers on the same weights (float32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.weights import load_model
from testkit.paged import PagedDriver

TOLERANCE = 1e-4
TINY_FAMILIES = ["llama", "llama31", "mistral", "qwen2", "qwen3"]


def hf_logits(folder: Path, token_ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def random_tokens(count: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def chunked_logits(driver: PagedDriver, tokens: list[int], prefix: int, chunk: int) -> torch.Tensor:
    """Prefill `prefix` tokens in one go, then the rest `chunk` tokens at a time."""
    pieces = [driver.step([(0, tokens[:prefix])])[0]] if prefix else []
    for start in range(prefix, len(tokens), chunk):
        pieces.append(driver.step([(0, tokens[start : start + chunk])])[0])
    return torch.cat(pieces)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_model_dir) -> tuple[Path, list[int], torch.Tensor]:
    folder = tiny_model_dir(request.param)
    tokens = random_tokens(150, 512, seed=1)
    return folder, tokens, hf_logits(folder, tokens)


def test_whole_prompt_prefill(tiny) -> None:
    folder, tokens, reference = tiny
    driver = PagedDriver(load_model(folder).model)
    ours = driver.step([(0, tokens)])[0]
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunks_on_a_cached_prefix(tiny, chunk: int) -> None:
    folder, tokens, reference = tiny
    driver = PagedDriver(load_model(folder).model)
    ours = chunked_logits(driver, tokens, prefix=37, chunk=chunk)
    assert (ours - reference).abs().max().item() <= TOLERANCE


def test_decode_steps(tiny) -> None:
    """Greedy decode with our cache reproduces transformers' logits at every new position."""
    folder, tokens, _ = tiny
    driver = PagedDriver(load_model(folder).model)
    sequence = tokens[:40]
    logits = driver.step([(0, sequence)])[0][-1]
    steps = []
    for _ in range(12):
        sequence.append(int(logits.argmax()))
        logits = driver.step([(0, [sequence[-1]])])[0][-1]
        steps.append(logits)
    reference = hf_logits(folder, sequence)[40:]
    assert (torch.stack(steps) - reference).abs().max().item() <= TOLERANCE


def test_mixed_batch_equals_each_sequence_alone(tiny_model_dir) -> None:
    """Prefill chunks and decodes of sequences with different cached prefixes, in one batch."""
    model = load_model(tiny_model_dir("qwen3")).model
    prompts = [random_tokens(n, 512, seed=10 + n) for n in (5, 33, 64, 90)]

    alone = []
    for prompt in prompts:
        driver = PagedDriver(model, seed=3)
        first = driver.step([(0, prompt[:-4])])[0]
        rest = driver.step([(0, prompt[-4:-1])])[0]
        last = driver.step([(0, prompt[-1:])])[0]
        alone.append(torch.cat([first, rest, last]))

    driver = PagedDriver(model, seed=4)
    # Step 1: seq 0 and 1 prefill most of their prompt; seq 2 prefills part of it.
    s1 = driver.step([(0, prompts[0][:-4]), (1, prompts[1][:-4]), (2, prompts[2][:30])])
    # Step 2: seq 3 starts, seq 2 continues, seq 0 and 1 take three tokens each.
    s2 = driver.step(
        [(3, prompts[3][:-4]), (0, prompts[0][-4:-1]), (2, prompts[2][30:-4]), (1, prompts[1][-4:-1])]
    )
    # Step 3: a mix of decode-sized and chunk-sized work.
    s3 = driver.step(
        [(1, prompts[1][-1:]), (2, prompts[2][-4:-1]), (3, prompts[3][-4:-1]), (0, prompts[0][-1:])]
    )
    s4 = driver.step([(2, prompts[2][-1:]), (3, prompts[3][-1:])])
    together = [
        torch.cat([s1[0], s2[1], s3[3]]),
        torch.cat([s1[1], s2[3], s3[0]]),
        torch.cat([s1[2], s2[2], s3[1], s4[0]]),
        torch.cat([s2[0], s3[2], s4[1]]),
    ]
    for mine, reference in zip(together, alone, strict=True):
        assert (mine - reference).abs().max().item() <= TOLERANCE


@pytest.mark.slow
def test_smollm2_parity_in_all_regimes(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "The paged KV cache keeps every sequence's keys and values in fixed-size blocks. " * 3
    tokens = tokenizer(text)["input_ids"]
    reference = hf_logits(smollm2_dir, tokens)
    model = load_model(smollm2_dir).model
    whole = PagedDriver(model, block_size=16).step([(0, tokens)])[0]
    assert (whole - reference).abs().max().item() <= TOLERANCE
    for chunk in (1, 7, 64):
        ours = chunked_logits(PagedDriver(model, block_size=16), tokens, prefix=21, chunk=chunk)
        assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_follows_float32(tiny_model_dir, dtype: torch.dtype) -> None:
    folder = tiny_model_dir("llama")
    tokens = random_tokens(60, 512, seed=5)
    full = PagedDriver(load_model(folder).model).step([(0, tokens)])[0]
    half = PagedDriver(load_model(folder, dtype=dtype).model).step([(0, tokens)])[0]
    assert half.dtype == torch.float32  # logits are always float32
    assert (half - full).abs().max().item() < 0.1 * full.abs().max().item()
