"""Build our decoder and fill it from a Hugging Face checkpoint folder (*.safetensors)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from engine.model_config import ModelConfig, UnsupportedModelError
from engine.models.decoder import CausalLM
from kernels.backend import AttentionBackend, default_backend
from kernels.elementwise import default_elementwise


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded; the message names the file at fault, in one line."""


# Checkpoint tensors that land in a slice of one of our fused parameters: (our name, shard index).
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_FUSED_NAME = re.compile(
    r"^(model\.layers\.\d+)\.(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.(weight|bias)$"
)
# Tensors some checkpoints carry that the model recomputes or does not use.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$|\.masked_bias$|\.attn\.bias$")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    path: Path


def read_model_config(folder: Path) -> ModelConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file}: not found (a model folder needs config.json)")
    try:
        json.loads(config_file.read_text())
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{config_file}: not a valid model config ({_one_line(err)})") from err
    try:
        return ModelConfig.from_hf(hf_config)
    except UnsupportedModelError as err:
        raise ModelLoadError(f"{config_file}: {err}") from err


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, backend: AttentionBackend | None = None
) -> CausalLM:
    """An uninitialised model on `device` (weights are garbage until loaded or randomised)."""
    with torch.device("meta"):
        model = CausalLM(config, backend or default_backend(device), default_elementwise(device))
    model = model.to(dtype=dtype).to_empty(device=device)
    # The rotary tables are derived, not loaded: rebuild them on the real device.
    model.model.rotary.build(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    backend: AttentionBackend | None = None,
    random_weights: bool = False,
) -> LoadedModel:
    """The model in `folder`; with `random_weights`, its config.json shape with random weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder not found")
    config = read_model_config(folder)
    if random_weights:
        model = build_model(config, dtype, torch.device(device), backend)
        randomize_weights(model)
        return LoadedModel(model=model, config=config, path=folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weight files")
    device = torch.device(device)
    model = build_model(config, dtype, device, backend)
    _load_weights(model, config, files)
    return LoadedModel(model=model, config=config, path=folder)


def _load_weights(model: CausalLM, config: ModelConfig, files: list[Path]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[str, int] = {}  # parameter name -> rows filled so far
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                    _load_tensor(name, reader.get_tensor(name), params, config, filled, file)
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{file}: cannot read weights ({_one_line(err)})") from err
    missing = [
        name
        for name, param in params.items()
        if filled.get(name, 0) < param.shape[0]
        and not (name == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing:
        raise ModelLoadError(f"{files[0].parent}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")


def _load_tensor(
    name: str,
    tensor: torch.Tensor,
    params: dict[str, torch.nn.Parameter],
    config: ModelConfig,
    filled: dict[str, int],
    file: Path,
) -> None:
    if _IGNORED.search(name):
        return
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return
    target, rows = name, slice(None)
    fused = _FUSED_NAME.match(name)
    if fused:
        prefix, part, kind = fused.groups()
        fused_name, shard = _FUSED[part]
        target = f"{prefix}.{fused_name}.{kind}"
        rows = _shard_rows(config, fused_name, shard)
    param = params.get(target)
    if param is None:
        raise ModelLoadError(f"{file}: unexpected tensor {name} for a {config.model_type} model")
    destination = param.data[rows]
    if destination.shape != tensor.shape:
        raise ModelLoadError(
            f"{file}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(destination.shape)}"
        )
    destination.copy_(tensor)
    filled[target] = filled.get(target, 0) + tensor.shape[0]


def _shard_rows(config: ModelConfig, fused_name: str, shard: int) -> slice:
    if fused_name == "self_attn.qkv_proj":
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        starts = (0, q_size, q_size + kv_size)
        sizes = (q_size, kv_size, kv_size)
    else:
        starts = (0, config.intermediate_size)
        sizes = (config.intermediate_size, config.intermediate_size)
    return slice(starts[shard], starts[shard] + sizes[shard])


def randomize_weights(model: CausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Fill a built model with random weights (for benchmarks of real shapes without a download)."""
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        # Drawn on the parameter's own device: an 8B model would take minutes on the host.
        generator = torch.Generator(device=param.device).manual_seed(seed * 100_003 + index)
        param.data.normal_(0.0, std, generator=generator)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]
