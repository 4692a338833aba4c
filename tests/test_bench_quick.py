"""The GPU benches run in their quick CPU modes (the figures themselves are the benches' to
report, not the tests' to assert)."""

import json
import sys

import pytest

from helpers import ROOT, clean_env, run


def quick(script):
    result = run([sys.executable, str(ROOT / "bench" / script), "--quick", "--json"], env=clean_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_inference_latency_quick_mode():
    (row,) = quick("inference_latency.py")
    assert (row["backbone"], row["size"], row["head"], row["device"]) == ("kosmos", "tiny", "scaled", "cpu")
    assert row["cached_ms"] > 0 and row["recompute_ms"] > 0
    assert row["speedup"] == pytest.approx(row["recompute_ms"] / row["cached_ms"])
    assert row["head_parameters"] < row["parameters"]


def test_train_step_quick_mode():
    rows = quick("train_step.py")
    assert [(r["backbone"], r["mode"], r["precision"]) for r in rows] == [("kosmos", "full", "32-true"),
                                                                          ("kosmos", "lora", "32-true")]
    full, lora = rows
    assert full["trainable"] == full["parameters"] and lora["trainable"] < lora["parameters"]
    for r in rows:
        assert r["flops_per_step"] > 1e8 and r["step_s"] > 0 and 0 < r["mfu"] < 1
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["step_s"]) and r["peak_memory_gib"] is None
