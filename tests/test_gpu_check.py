"""benchmarks/gpu_check.py: the CPU path (``--tiny``) runs all four contenders, and without a GPU the full check
stops with a clear message before building anything."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=1200)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible: the full check would run")
def test_full_check_without_gpu_is_a_clear_error():
    completed = run_script()
    assert completed.returncode != 0
    assert "No CUDA device visible" in completed.stderr and "--tiny" in completed.stderr


@pytest.mark.integration
def test_tiny_check_runs_ours_and_peft_side_by_side(tmp_path):
    completed = run_script("--tiny", "--cache", str(tmp_path))
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload = json.loads(completed.stdout.strip().splitlines()[-1])
    results = payload["results"]
    assert list(results) == ["ours LoRA", "ours LoRA, chunked loss", "ours Sensitivity-LoRA", "PEFT LoRA"]
    for name, result in results.items():
        assert len(result["step_s"]) == payload["args"]["steps"] == 3, name
        assert all(math.isfinite(loss) for loss in result["losses"]), name
        assert result["tokens_per_s"] > 0 and result["peak_mib"] > 0, name
    # same random base, adapters start at B = 0: every contender's first loss is the base model's
    first = [result["losses"][0] for result in results.values()]
    assert max(first) - min(first) < 1e-3 * abs(first[0])
    assert "| PEFT LoRA |" in completed.stdout and "peak RSS (GiB)" in completed.stdout
    assert not (SCRIPT.parent / "results" / "gpu_check.md").exists() or "--tiny" not in (
        SCRIPT.parent / "results" / "gpu_check.md").read_text()
