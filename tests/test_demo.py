"""The embedded default, shortened (a small warm start, two RL steps per selector, the per-family reports),
and the per-family figures on hand-made labels."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from harmony_mcore.demo import (
    METHODS,
    contrast,
    family_label_figures,
    family_summary,
    format_table,
    selector_agreement,
)
from harmony_mcore.labels import AnswerSample, LabelConfig, label_batch
from harmony_mcore.records import REFRAME, SOLVER

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_demo_completes_and_reports(tmp_path):
    command = [sys.executable, "-m", "harmony_mcore", "demo", "--short", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["results"]) == {"harmonic", "majority", "arithmetic"}
    for method in METHODS:
        (run,) = summary["results"][method]
        assert 0.0 <= run["avg@k_before"] <= 1.0 and 0.0 <= run["avg@k_after"] <= 1.0 and run["steps"] == 2
        assert (tmp_path / f"{method}_seed1" / "report.png").stat().st_size > 10_000
        assert set(run["families"]) == {"ordinary", "trapped"}
        for family in run["families"].values():
            assert 0.0 <= family["avg@k_before"] <= 1.0 and 0.0 <= family["maj@k_after"] <= 1.0
            assert len(family["label_acc"]) == 2  # one per step (None where no such question was drawn)
        assert 0.0 <= run["families"]["trapped"]["spurious_label_share_mean"] <= 1.0
        assert 0.0 <= run["families"]["trapped"]["selector_agreement"] <= 1.0
        assert "spurious_label_share" not in run["families"]["ordinary"]
    # Same warm-start model and evaluation seeds: every selector starts from the same accuracy, per family.
    for family in ("ordinary", "trapped"):
        before = {summary["results"][m][0]["families"][family]["avg@k_before"] for m in METHODS}
        assert len(before) == 1
    assert summary["contrast_trapped_harmonic_minus_majority"]["avg@k_after"]["per_seed"]
    assert (tmp_path / "comparison.png").stat().st_size > 10_000
    table = (tmp_path / "summary.md").read_text()
    assert "**trapped questions**" in table and "TTRL (majority, solver view)" in table
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


# ----------------------------------------------------------------------------- per-family figures

FAMILY = {"o1": "ordinary", "t1": "trapped", "t2": "trapped"}
SPURIOUS = {"t1": "13", "t2": "6"}


def _samples() -> list[AnswerSample]:
    """o1 (truth 9): both views say 9. t1 (truth 9, spurious 13): solver 13 13 13 9, reframe 9 9 9 5.
    t2 (truth 4, spurious 6): solver 6 6 6 6, reframe 1 2 3 5 (no answer in both views)."""
    answers = {"o1": ("9999", "9999"), "t1": (("13", "13", "13", "9"), "9995"), "t2": ("6666", "1235")}
    truth = {"o1": "9", "t1": "9", "t2": "4"}
    return [AnswerSample(qid, view, text=f"so \\boxed{{{a}}}", ground_truth=truth[qid])
            for qid, views in answers.items()
            for view, column in zip((SOLVER, REFRAME), views) for a in column]


def test_family_label_figures_by_hand():
    """harmonic: t1 scores 9 at 2 (1/4)(3/4)/1 = 0.375 and 13 at 0 (absent from the reframe view) -> right;
    t2 has no answer in both views -> empty. majority (solver view): t1 -> 13, t2 -> 6, both spurious."""
    def figures(strategy: str) -> dict:
        return family_label_figures(label_batch(_samples(), LabelConfig(strategy=strategy)), FAMILY, SPURIOUS)

    # Sample shares do not depend on the selector: trapped solver view right 1 of 8 samples, spurious 3 + 4
    # of 8; reframe view right 3 of 8, spurious 0.
    samples = {"solver_right": 0.125, "solver_spurious": 0.875, "reframe_right": 0.375,
               "reframe_spurious": 0.0}
    assert figures("harmonic") == {
        "ordinary": {"accuracy": 1.0, "empty_share": 0.0, "questions": 1.0, "solver_right": 1.0,
                     "reframe_right": 1.0},
        "trapped": {"accuracy": 0.5, "empty_share": 0.5, "questions": 2.0, "spurious_share": 0.0, **samples}}
    assert figures("majority")["trapped"] == {"accuracy": 0.0, "empty_share": 0.0, "questions": 2.0,
                                              "spurious_share": 1.0, **samples}
    # Pooled (arithmetic): t1 9 at (1/4 + 3/4)/2 = 0.5 beats 13 at (3/4 + 0)/2 = 0.375 -> right;
    # t2 6 at (1 + 0)/2 = 0.5 beats 1, 2, 3, 5 at 1/8 each -> spurious.
    assert figures("arithmetic")["trapped"] == {"accuracy": 0.5, "empty_share": 0.0, "questions": 2.0,
                                                "spurious_share": 0.5, **samples}


def test_family_summary_by_hand():
    rows = [{"step": 0, "eval/avg@k": 0.5, "eval/synthetic/avg@k": 0.9, "eval/synthetic/maj@k": 1.0,
             "eval/synthetic-trap/avg@k": 0.2, "eval/synthetic-trap/maj@k": 0.0},
            {"step": 1, "labels/accuracy": 0.5},
            {"step": 2, "labels/accuracy": 0.7, "eval/avg@k": 0.6, "eval/synthetic/avg@k": 0.95,
             "eval/synthetic/maj@k": 1.0, "eval/synthetic-trap/avg@k": 0.4, "eval/synthetic-trap/maj@k": 0.5}]
    figures = [{"ordinary": {"accuracy": 1.0, "questions": 3.0},
                "trapped": {"accuracy": 0.0, "questions": 1.0, "spurious_share": 1.0}},
               {"ordinary": {"accuracy": 0.5, "questions": 2.0},
                "trapped": {"accuracy": 0.5, "questions": 2.0, "spurious_share": 0.5}},
               {"ordinary": {"accuracy": 1.0, "questions": 4.0}}]  # no trapped question drawn this step
    out = family_summary(rows, figures, {"synthetic": "ordinary", "synthetic-trap": "trapped"})
    ordinary, trapped = out["ordinary"], out["trapped"]
    assert (ordinary["avg@k_before"], ordinary["avg@k_after"], ordinary["maj@k_after"]) == (0.9, 0.95, 1.0)
    assert (trapped["avg@k_before"], trapped["avg@k_after"], trapped["maj@k_curve"]) == (0.2, 0.4, [0.0, 0.5])
    assert trapped["avg@k_steps"] == [0, 2]
    assert ordinary["label_acc"] == [1.0, 0.5, 1.0] and "spurious_label_share" not in ordinary
    assert ordinary["label_acc_mean"] == pytest.approx((3 + 1 + 4) / 9)  # per question over the steps
    assert ordinary["label_acc_first_half"] == 1.0
    assert ordinary["label_acc_second_half"] == pytest.approx(5 / 6)
    assert trapped["label_acc"][:2] == [0.0, 0.5] and math.isnan(trapped["label_acc"][2])
    assert trapped["label_acc_mean"] == pytest.approx(1 / 3)
    assert trapped["spurious_label_share_mean"] == pytest.approx(2 / 3)
    assert trapped["spurious_label_share_second_half"] == 0.5  # steps 1 and 2: step 2 drew no trapped one


def _result(after_trapped: float, acc_trapped: float) -> dict:
    fam = {"avg@k_before": 0.2, "avg@k_after": after_trapped, "maj@k_before": 0.0, "maj@k_after": 0.5,
           "label_acc_mean": acc_trapped, "label_acc_first_half": acc_trapped,
           "label_acc_second_half": acc_trapped, "spurious_label_share_first_half": 0.1,
           "spurious_label_share_second_half": 0.1, "empty_label_share_mean": 0.0, "selector_agreement": 0.5}
    ordinary = {k: v for k, v in fam.items() if "spurious" not in k}
    ordinary |= {"avg@k_after": 0.95, "label_acc_mean": 1.0}
    return {"families": {"ordinary": ordinary, "trapped": fam}}


def test_contrast_and_table():
    results = {"harmonic": [_result(0.5, 0.8), _result(0.6, 0.7), _result(0.4, 0.9)],
               "majority": [_result(0.1, 0.1), _result(0.2, 0.0), _result(0.1, 0.2)]}
    c = contrast(results, "trapped", "avg@k_after")
    assert c["per_seed"] == pytest.approx([0.4, 0.4, 0.3])
    assert c["mean"] == pytest.approx(11 / 30) and c["std"] == pytest.approx(0.0577350, abs=1e-6)  # ddof = 1
    assert c["exceeds_2std"]
    noisy = contrast({"harmonic": [_result(0.5, 0.8), _result(0.1, 0.8)],
                      "majority": [_result(0.1, 0.1), _result(0.3, 0.1)]}, "trapped", "avg@k_after")
    assert noisy["mean"] == pytest.approx(0.1) and not noisy["exceeds_2std"]
    table = format_table(results)
    assert "**ordinary questions**" in table and "**trapped questions**" in table
    assert "| Self-Harmony (harmonic) | 0.200 ± 0.000 | 0.500 ± 0.100 | 0.300 ± 0.100 |" in table
    assert "final avg@k: +0.367 ± 0.058 over 3 seeds; exceeds twice the seed-to-seed std." in table
    assert "pick the same label for 0.500 ± 0.000 of the trapped questions" in table


def test_selector_agreement_by_hand():
    """Same samples: harmonic labels o1 9, t1 9, t2 empty; TTRL o1 9, t1 13, t2 6; pooled o1 9, t1 9, t2 6."""
    by_selector = {m: [label_batch(_samples(), LabelConfig(strategy=m))] * 2 for m in METHODS}
    assert selector_agreement(by_selector, FAMILY) == {"ordinary": 1.0, "trapped": 0.0}
    two = {m: by_selector[m] for m in ("harmonic", "arithmetic")}
    assert selector_agreement(two, FAMILY) == {"ordinary": 1.0, "trapped": 0.5}
