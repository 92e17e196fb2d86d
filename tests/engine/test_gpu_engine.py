"""The engine on an NVIDIA GPU: bf16 model against the float32 reference, cache on/off equality."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.weights import load_model
from testkit.engine import mixed_workload, run_all
from testkit.numerics import relative_error
from testkit.paged import PagedDriver

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_model_on_gpu_follows_float32_reference(tiny_model_dir, family: str) -> None:
    folder = tiny_model_dir(family)
    tokens = torch.randint(3, 512, (300,), generator=torch.Generator().manual_seed(11)).tolist()
    reference = PagedDriver(load_model(folder).model, block_size=16).step([(0, tokens)])[0]
    gpu = PagedDriver(load_model(folder, dtype=torch.bfloat16, device="cuda").model, block_size=16)
    whole = gpu.step([(0, tokens[:200])])[0]
    chunks = [gpu.step([(0, tokens[start : start + 37])])[0] for start in range(200, 300, 37)]
    ours = torch.cat([whole, *chunks]).cpu()
    assert torch.isfinite(ours).all()
    assert relative_error(ours, reference) < 2e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_outputs_equal_with_cache_on_and_off_on_gpu(tiny_model_dir, dtype: str) -> None:
    folder: Path = tiny_model_dir("llama")
    prompts, params = mixed_workload()
    outputs = []
    for caching, budget in ((False, 4096), (True, 4096), (True, 16)):
        config = EngineConfig(
            model=str(folder),
            device="cuda",
            dtype=dtype,
            block_size=16,
            num_blocks=512,
            enable_prefix_caching=caching,
            max_batched_tokens=budget,
        )
        loaded = load_model(folder, dtype=config.torch_dtype(torch.device("cuda")), device="cuda")
        outputs.append(run_all(EngineCore(config, loaded), prompts, params))
    if dtype == "float32":
        assert outputs[0] == outputs[1] == outputs[2]
    else:
        # bf16 sums in a different order per batch shape; near-ties may flip, but rarely.
        same = sum(outputs[0][k] == outputs[i][k] for i in (1, 2) for k in outputs[0])
        assert same >= 0.9 * 2 * len(outputs[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_matches_eager(tiny_model_dir, dtype: str) -> None:
    folder: Path = tiny_model_dir("qwen3")
    prompts, params = mixed_workload(seed=5)
    outputs, engines = [], []
    for graphs in (False, True):
        config = EngineConfig(
            model=str(folder), device="cuda", dtype=dtype, num_blocks=512, max_num_seqs=24, cuda_graphs=graphs
        )
        loaded = load_model(folder, dtype=config.torch_dtype(torch.device("cuda")), device="cuda")
        engine = EngineCore(config, loaded)
        outputs.append(run_all(engine, prompts, params))
        engines.append(engine)
    assert engines[0].runner.graphs is None
    assert engines[1].runner.graphs is not None and engines[1].runner.graphs.replays > 0
    if dtype == "float32":
        assert outputs[0] == outputs[1]
    else:
        same = sum(outputs[0][k] == outputs[1][k] for k in outputs[0])
        assert same >= 0.9 * len(outputs[0])


def test_one_sequence_chunks_replay_graphs_and_match_eager(tiny_model_dir) -> None:
    """Agent-style turns: one request at a time on a growing cached prefix, graphs on and off."""
    folder: Path = tiny_model_dir("llama")
    prompts, params = mixed_workload(seed=6)
    outputs = []
    for graphs in (False, True):
        config = EngineConfig(
            model=str(folder), device="cuda", dtype="float32", num_blocks=512, cuda_graphs=graphs
        )
        engine = EngineCore(config, load_model(folder, device="cuda"))
        outputs.append(
            [run_all(engine, [p], [s])["r0"] for p, s in zip(prompts[:12], params[:12], strict=True)]
        )
        if graphs:
            assert engine.runner.graphs is not None and engine.runner.graphs.prefill_replays > 0
    assert outputs[0] == outputs[1]


def test_chunks_that_fill_a_prefill_bucket_match_eager(tiny_model_dir) -> None:
    """A chunk of exactly a bucket's tokens runs that bucket with a padding sequence of no rows;
    one token more takes the next bucket. Fresh prompts and one on a cached prefix."""
    import random

    from engine.sampling_params import SamplingParams

    folder: Path = tiny_model_dir("llama")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (16, 17, 48, 128, 129, 512)]
    prompts.append(prompts[3] + [rng.randrange(3, 500) for _ in range(128)])  # 128 new on 128 cached
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outputs = []
    for graphs in (False, True):
        engine = _float32_engine(folder, graphs, num_blocks=512)
        outputs.append([run_all(engine, [p], [params])["r0"] for p in prompts])
        if graphs:
            assert engine.runner.graphs is not None
            assert engine.runner.graphs.prefill_replays >= len(prompts)
    assert outputs[0] == outputs[1]


def _float32_engine(folder: Path, graphs: bool, **options: int) -> EngineCore:
    config = EngineConfig(model=str(folder), device="cuda", dtype="float32", cuda_graphs=graphs, **options)  # type: ignore[arg-type]
    return EngineCore(config, load_model(folder, device="cuda"))


def _staggered_turns(engine: EngineCore, seed: int) -> dict[str, list[int]]:
    """Requests arriving one per step while earlier ones decode: each arrival's step holds the
    running decodes beside one new prompt chunk (short, or past the chunk graphs' 512 tokens)."""
    import random

    from engine.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    requests = []
    for i in range(14):
        length = 600 if i == 9 else rng.randrange(2, 120)
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(3, 12), ignore_eos=True)
        requests.append(engine.add_request(prompt, params, request_id=f"r{i}"))
        engine.step()
    while engine.has_unfinished:
        engine.step()
    return {r.request_id: r.output_token_ids for r in requests}


def test_decodes_beside_one_chunk_run_piecewise_and_match_eager(tiny_model_dir) -> None:
    folder: Path = tiny_model_dir("llama")
    outputs, runners = [], []
    for graphs in (False, True):
        engine = _float32_engine(folder, graphs, num_blocks=1024)
        outputs.append(_staggered_turns(engine, seed=7))
        runners.append(engine.runner)
    assert runners[0].piecewise is None
    assert runners[1].piecewise is not None
    assert runners[1].piecewise.runs >= 11  # every arrival but the first, the 600-token one too
    assert outputs[0] == outputs[1]


def _prompt_fed_one_token_a_step(engine: EngineCore) -> dict[str, list[int]]:
    """Three decodes fill a 4-token step budget but one token, so a 30-token prompt is fed one
    token a step: pure one-token batches in which the prompt's row samples nothing."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    decoding = [engine.add_request([5 + i, 9], params, request_id=f"d{i}") for i in range(3)]
    engine.step()
    prompt = engine.add_request(list(range(40, 70)), SamplingParams(temperature=0.0, max_tokens=5), "p")
    while engine.has_unfinished:
        engine.step()
    return {r.request_id: r.output_token_ids for r in [*decoding, prompt]}


def test_decode_graph_skips_a_one_token_chunk_that_does_not_sample(tiny_model_dir) -> None:
    folder: Path = tiny_model_dir("llama")
    outputs, runners = [], []
    for graphs in (False, True):
        engine = _float32_engine(folder, graphs, num_blocks=512, max_batched_tokens=4, max_num_seqs=4)
        outputs.append(_prompt_fed_one_token_a_step(engine))
        runners.append(engine.runner)
    assert runners[1].graphs is not None and runners[1].graphs.replays >= 20
    assert outputs[0] == outputs[1]
