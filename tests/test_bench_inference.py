"""bench/inference_latency.py runs in its quick mode (the figures themselves are the bench's
to report, not the test's to assert)."""

import json
import sys

import pytest

from helpers import ROOT, clean_env, run


def test_inference_latency_quick_mode():
    result = run([sys.executable, str(ROOT / "bench" / "inference_latency.py"), "--quick", "--json", "--threads", "1"],
                 env=clean_env())
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert (row["backbone"], row["size"], row["head"], row["device"]) == ("kosmos", "tiny", "scaled", "cpu")
    assert row["cached_ms"] > 0 and row["recompute_ms"] > 0
    assert row["speedup"] == pytest.approx(row["recompute_ms"] / row["cached_ms"])
    assert row["head_parameters"] < row["parameters"]
