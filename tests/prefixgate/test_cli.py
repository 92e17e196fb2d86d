"""The `prefixgate` command as a user runs it: a real process, real model files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "prefixgate.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.mark.slow
def test_generate_answers_with_the_embedded_model(smollm2_dir: Path) -> None:
    result = run_cli("generate", "What is the capital of France?", "--max-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    # The load time is printed (the README quotes it); its value is not asserted here.
    assert re.search(r"loaded .* in \d+\.\d+ s", result.stderr)


def test_missing_model_folder_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = run_cli("generate", "hi", "--model", str(missing))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert str(missing) in result.stderr


def test_corrupt_weights_name_the_file(tmp_path: Path, tiny_model_dir) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = run_cli("generate", "hi", "--model", str(folder), "--raw")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert str(weights) in result.stderr


def test_missing_config_names_the_file(tmp_path: Path, tiny_model_dir) -> None:
    folder = tmp_path / "no-config"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "config.json").unlink()
    result = run_cli("generate", "hi", "--model", str(folder))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(folder / "config.json") in result.stderr
