"""Grammar masks on the GPU: the same constrained outputs as on the CPU, nothing outside the grammar.

The model is a tiny random checkpoint and the tokenizer a byte-level BPE trained here on a few
JSON strings (so no model files are needed on the GPU machine). Random weights make the
grammar do all the work: every token must come through the mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.sampling_params import Grammar, SamplingParams
from engine.weights import load_model
from testkit.models import TINY_VOCAB

pytest.importorskip("llguidance")
pytestmark = pytest.mark.gpu

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def byte_level_tokenizer(vocab_size: int = TINY_VOCAB) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],  # </s> is id 2, the tiny models' EOS
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        json.dumps({"name": n, "age": a, "tags": ["a", "b"]}) for n in ("ann", "bob", "cy") for a in (7, 42)
    ]
    tokenizer.train_from_iterator(corpus * 20, trainer)
    return tokenizer


def _run(folder: Path, device: str, tokenizer: Tokenizer) -> dict[str, tuple[list[int], str]]:
    config = EngineConfig(model=str(folder), device=device, dtype="float32", block_size=16, num_blocks=256)
    loaded = load_model(folder, dtype=torch.float32, device=device)
    core = EngineCore(config, loaded, tokenizer=tokenizer)
    grammars = [
        Grammar("json_schema", json.dumps(SCHEMA)),
        Grammar("json_object"),
        Grammar("lark", 'start: "yes" | "no" | "maybe"'),
        None,  # an unconstrained row in the same batch
    ]
    requests = []
    for i in range(8):
        prompt = torch.randint(3, 300, (10 + 7 * i,), generator=torch.Generator().manual_seed(i)).tolist()
        params = SamplingParams(max_tokens=40, temperature=0, grammar=grammars[i % 4])
        requests.append(core.add_request(prompt, params, request_id=f"r{i}"))
    while core.has_unfinished:
        core.step()
    core.check_integrity()
    return {r.request_id: (r.output_token_ids, r.finish_reason.value) for r in requests}


def test_grammar_masks_on_gpu_match_cpu(tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    tokenizer = byte_level_tokenizer()
    assert tokenizer.get_vocab_size() <= TINY_VOCAB
    on_cpu = _run(folder, "cpu", tokenizer)
    on_gpu = _run(folder, "cuda", tokenizer)
    for i in range(8):
        tokens, reason = on_gpu[f"r{i}"]
        assert reason in ("stop", "length"), (i, reason)  # never "abort": no token left the grammar
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if i % 4 == 0 and reason == "stop":
            value = json.loads(text)
            assert set(value) == {"name", "age", "tags"} and 0 <= value["age"] <= 120
        if i % 4 == 1 and reason == "stop":
            assert isinstance(json.loads(text), dict)
        if i % 4 == 2:
            assert reason == "stop" and text in ("yes", "no", "maybe"), text
    # float32 on both: greedy argmax over masked logits gives the same tokens, bar near-ties.
    same = sum(on_cpu[k] == on_gpu[k] for k in on_cpu)
    assert same >= 7, {k: (on_cpu[k], on_gpu[k]) for k in on_cpu if on_cpu[k] != on_gpu[k]}
