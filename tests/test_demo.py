"""The embedded default, shortened: a small warm start, two RL steps per method, the table and the reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_demo_completes_and_reports(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harmony_mcore", "demo", "--short", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for method in ("harmonic", "majority"):
        (run,) = summary["results"][method]
        assert 0.0 <= run["avg@k_before"] <= 1.0 and 0.0 <= run["avg@k_after"] <= 1.0 and run["steps"] == 2
        assert (tmp_path / f"{method}_seed1" / "report.png").stat().st_size > 10_000
    # Same warm-start model and evaluation seeds: both methods start from the same accuracy.
    assert summary["results"]["harmonic"][0]["avg@k_before"] == summary["results"]["majority"][0]["avg@k_before"]
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
    assert "Self-Harmony (harmonic)" in (tmp_path / "summary.md").read_text()
    stamp = json.loads((tmp_path / "model" / "warm_start.json").read_text())
    assert stamp["nll_last"] < stamp["nll_first"]  # the supervised warm start learned


def test_shipped_warm_start_matches_the_default_settings():
    """The model shipped in harmony_mcore/assets is the one the default settings build (else the demo would
    silently rebuild it, several minutes); rebuild with `harmony-mcore demo --rebuild-model --ship-model`."""
    from safetensors import safe_open

    from harmony_mcore.demo import SHIPPED_MODEL, WarmStartSettings

    stamp = json.loads((SHIPPED_MODEL / "warm_start.json").read_text())
    assert stamp["digest"] == WarmStartSettings().digest()
    config = json.loads((SHIPPED_MODEL / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["head_dim"] >= 32
    (shard,) = (SHIPPED_MODEL / "hf").glob("*.safetensors")
    with safe_open(shard, "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").shape[1] == config["hidden_size"]
