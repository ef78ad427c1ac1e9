"""`benchmarks/gpu.py --device cpu --quick`: the GPU benchmark's CPU mode runs in seconds, drives the recipes
without Ray, and writes every section with finite figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
SECTIONS = ("device", "matmul", "flops", "training", "largest_batch", "inference", "input_path",
            "bf16_vs_fp32", "learning")  # fmt: skip


def numbers(value: Any) -> list[float]:
    """Every int/float inside `value` (bools and None left out)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list | tuple):
        return [x for v in value for x in numbers(v)]
    return []


def test_the_gpu_benchmark_runs_quick_on_cpu_without_ray(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ray_imported"] is False and "ray" not in result["third_party_imports"]
    assert result["device"]["type"] == "cpu" and result["device"]["name"]
    assert result["skipped"] == [], f"sections cut by the budget: {result['skipped']}"
    for section in SECTIONS:
        figures = numbers(result[section]) if section != "device" else [1.0]
        assert figures and all(math.isfinite(x) for x in figures), (section, result[section])
    cases = {(r["model"], r["dtype"], r["channels_last"], r["compile"]) for r in result["training"]}
    assert {("syncnet", "fp32", True, False), ("wav2lip", "bf16", False, True)} <= cases
    assert set(result["largest_batch"]) == {"syncnet", "wav2lip"}
    assert len(result["inference"]) == 2 and result["input_path"]["ratio"] > 0
    for kind in ("syncnet", "wav2lip"):
        curves = result["bf16_vs_fp32"][kind]
        assert len(curves["fp32"]) == len(curves["bf16"]) == curves["steps"] and curves["tolerance"] > 0
    assert (
        len(result["learning"]["expert"]["curve"]) >= 2 and len(result["learning"]["generator"]["curve"]) >= 2
    )
    assert "samples/s" in done.stdout and "frames/s" in done.stdout
