"""The offline `label` tool: JSON-lines rollouts in, labels and diagnostics out; bad rows named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harmony_mcore.labels import AnswerSample
from harmony_mcore.labels.cli import main
from harmony_mcore.labels.io import read_samples, write_samples

ROWS = [
    # q1: "4" is stable across views, "5" is popular in the solver view only (majority voting picks it)
    *[{"question_id": "q1", "view": "solver", "response": r"so \boxed{5}", "ground_truth": 4}] * 6,
    *[{"question_id": "q1", "view": "solver", "response": r"so \boxed{4.0}", "ground_truth": 4}] * 2,
    *[{"question_id": "q1", "view": "reframe", "answer": "4", "ground_truth": 4}] * 4,
    {"question_id": "q1", "view": "reframe", "answer": "5", "ground_truth": 4},
    *[{"question_id": "q1", "view": "reframe", "response": "no box", "ground_truth": 4}] * 3,
    # 7: no answer in both views -> empty label
    {"question_id": 7, "view": "solver", "answer": 2},
    {"question_id": 7, "view": "reframe", "response": "I give up"},
]


def write_rows(path, rows) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def read_rows(path) -> dict[str, dict]:
    return {row["question_id"]: row for row in map(json.loads, path.read_text().splitlines())}


def label(tmp_path, *options: str, rows=ROWS) -> int:
    """`label` on rows written to tmp_path/samples.jsonl, writing tmp_path/labels.jsonl; the exit status."""
    write_rows(tmp_path / "samples.jsonl", rows)
    paths = ["--input", str(tmp_path / "samples.jsonl"), "--output", str(tmp_path / "labels.jsonl")]
    return main(["label", *paths, *options])


def test_label_writes_one_row_per_question_and_prints_diagnostics(tmp_path, capsys):
    assert label(tmp_path) == 0
    labels = read_rows(tmp_path / "labels.jsonl")
    assert list(labels) == ["7", "q1"]
    q1 = labels["q1"]
    # HM(4) = 2 (2/8)(4/8) / (6/8) = 1/3; HM(5) = 2 (6/8)(1/8) / (7/8) = 3/14
    assert q1["label"] == "4" and q1["scores"] == pytest.approx({"4": 1 / 3, "5": 3 / 14})
    assert q1["counts"] == {"solver": {"4": 2, "5": 6}, "reframe": {"4": 4, "5": 1}}
    assert q1["samples"] == {"solver": 8, "reframe": 8} and q1["correct"] is True
    assert labels["7"]["label"] == "" and labels["7"]["correct"] is None
    printed = capsys.readouterr().out
    assert "labelled 2 questions from 18 samples with harmonic" in printed
    assert "labels/accuracy" in printed and "labels/empty_share" in printed


def test_strategy_and_lambda_options(tmp_path):
    assert label(tmp_path, "--strategy", "power_mean", "--lambda", "0") == 0
    # lambda = 0: majority over both views, 7 votes against 6
    assert read_rows(tmp_path / "labels.jsonl")["q1"]["label"] == "5"


@pytest.mark.parametrize("bad_row, message", [
    ("{not json", "line 3: not valid JSON"),
    ([1, 2], "line 3: must be a JSON object, got list"),
    ({"view": "solver", "answer": "1"}, "line 3, field 'question_id': is required"),
    ({"question_id": 1.5, "view": "solver", "answer": "1"},
     "line 3, field 'question_id': must be a string or an integer, got float"),
    ({"question_id": "q", "view": "critic", "answer": "1"}, "line 3, field 'view': unknown view 'critic'"),
    ({"question_id": "q", "view": "solver"},
     "line 3, field 'response': is required when the row has no 'answer'"),
    ({"question_id": "q", "view": "solver", "response": 3},
     "line 3, field 'response': must be a string, got int"),
    ({"question_id": "q", "view": "solver", "answer": "1", "answer_type": "essay"},
     "line 3, field 'answer_type': must be one of ['math', 'choice'], got 'essay'"),
])
def test_bad_rows_are_named_by_line_and_field(tmp_path, capsys, bad_row, message):
    assert label(tmp_path, rows=[ROWS[0], "", bad_row]) == 2
    assert f"samples.jsonl, {message}" in capsys.readouterr().err
    assert not (tmp_path / "labels.jsonl").exists()


def test_bad_option_is_an_error_naming_the_field(tmp_path, capsys):
    assert label(tmp_path, "--strategy", "prior", "--prior-pi", "1.5") == 2
    assert "labels.prior_pi: must be in (0, 1), got 1.5" in capsys.readouterr().err


def test_runs_as_a_module(tmp_path):
    write_rows(tmp_path / "samples.jsonl", ROWS)
    command = [sys.executable, "-m", "harmony_mcore.labels.cli", "label", "--strategy", "majority",
               "--input", str(tmp_path / "samples.jsonl"), "--output", str(tmp_path / "labels.jsonl")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert read_rows(tmp_path / "labels.jsonl")["q1"]["label"] == "5"


def test_dumped_samples_read_back_identical(tmp_path):
    samples = [AnswerSample("q1", "solver", r"so \boxed{1}", ground_truth="1"),
               AnswerSample("q1", "reframe", "", answer="B", answer_type="choice"),
               AnswerSample("q2", "reframe", "no answer")]
    write_samples(tmp_path / "dump.jsonl", samples[:2])
    write_samples(tmp_path / "dump.jsonl", samples[2:], append=True)
    assert read_samples(tmp_path / "dump.jsonl", ["solver", "reframe"]) == samples
