"""`harmony-mcore data prepare|synthetic` through main(argv) and `python -m harmony_mcore.data.cli`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harmony_mcore.data import load_questions
from harmony_mcore.data.cli import main
from harmony_mcore.data.synthetic import read_warm_start
from tests.test_data_fixtures import GSM8K_ROWS, MATH500_ROWS, write_gpqa_csv, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_prepare_math500(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "test.jsonl", MATH500_ROWS)
    output = tmp_path / "out" / "math500.jsonl"
    assert main(["prepare", "--source", "math500", "--input", str(source), "--output", str(output)]) == 0
    assert "wrote 2 questions (math500)" in capsys.readouterr().out
    assert [q.qid for q in load_questions(output)] == [
        "math500:test/prealgebra/101.json",
        "math500:test/algebra/202.json",
    ]


def test_prepare_gpqa_writes_choice_questions(tmp_path: Path) -> None:
    output = tmp_path / "gpqa.jsonl"
    argv = ["prepare", "--input", str(write_gpqa_csv(tmp_path / "g.csv")), "--output", str(output)]
    assert main([*argv, "--choice-seed", "3"]) == 0
    questions = load_questions(output)
    assert {q.answer_type for q in questions} == {"choice"}
    assert all("\nA) " in q.text for q in questions)


def test_prepare_reports_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "gsm8k.jsonl", [*GSM8K_ROWS, {"question": "Q?", "answer": "no marker"}])
    argv = ["prepare", "--source", "gsm8k", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    assert main(argv) == 2
    assert "gsm8k.jsonl, line 3, field 'answer': has no '####'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    assert main([*argv, "--skip-bad-rows"]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().err
    assert len(load_questions(tmp_path / "o.jsonl")) == 2


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--source", "nope", "--input", "x", "--output", "y"])
    assert exit_info.value.code == 2


def test_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["synthetic", "--output-dir", str(tmp_path), "--seed", "1", "--n-warm", "12", "--n-test", "5"]
    assert main([*argv, "--ops", "add,sub,mul", "--max-steps", "3"]) == 0
    assert len(read_warm_start(tmp_path / "warm.jsonl")) == 12
    assert len(load_questions(tmp_path / "test.jsonl")) == 5
    assert main([*argv, "--ops", "add,pow"]) == 2
    assert "ops must be distinct names" in capsys.readouterr().err


def test_runs_as_a_module(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    output = tmp_path / "gsm8k.jsonl"
    command = [
        sys.executable,
        "-m",
        "harmony_mcore.data.cli",
        "prepare",
        "--input",
        str(source),
        "--output",
        str(output),
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert [q.ground_truth for q in load_questions(output)] == ["17", "1000"]
