"""`harmony-mcore eval`: table and JSON writing, input errors, and two end-to-end runs on a tiny random model
(HF directory and the same weights as an mcore checkpoint: identical results with the same seed)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harmony_mcore import eval_cli
from harmony_mcore.eval_cli import ALL, BenchmarkRow, EvalInputError
from harmony_mcore.evaluate import QuestionResult
from harmony_mcore.records import SOLVER, Question, Rollout

REPO = Path(__file__).resolve().parents[1]
METRICS = {
    "eval/avg@k": 0.375, "eval/maj@k": 0.5, "eval/pass@k": 0.75, "eval/questions": 4.0,
    "eval/math500/avg@k": 0.5, "eval/math500/maj@k": 0.5, "eval/math500/pass@k": 1.0,
    "eval/math500/questions": 2.0,
    "eval/gpqa/avg@k": 0.25, "eval/gpqa/maj@k": 0.5, "eval/gpqa/pass@k": 0.5, "eval/gpqa/questions": 2.0,
}
QUESTIONS = [
    {"id": "m1", "question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "7",
     "answer_type": "math", "source": "arith"},
    {"id": "m2", "question": "What is 12 - 5?", "answer": "7", "answer_type": "math", "source": "arith"},
    {"id": "c1", "question": "Which is larger?\n(A) 3\n(B) 9", "answer": "B", "answer_type": "choice",
     "source": "quiz"},
    {"id": "u1", "question": "No answer known.", "answer": None, "answer_type": "math", "source": "quiz"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_rollout(qid: str, idx: int, text: str, finish: str = "stop") -> Rollout:
    return Rollout(qid, SOLVER, idx, (1,), (2, 3), (-0.1, -0.2), text, finish, 0)


# ------------------------------------------------------------------------------------------ pure functions


def test_benchmark_rows_from_summarize_keys():
    rows = eval_cli.benchmark_rows(METRICS)
    assert rows == [BenchmarkRow("gpqa", 2, 0.25, 0.5, 0.5), BenchmarkRow("math500", 2, 0.5, 0.5, 1.0),
                    BenchmarkRow(ALL, 4, 0.375, 0.5, 0.75)]


def test_table_shows_every_benchmark_in_percent():
    out = io.StringIO()
    eval_cli.print_table(eval_cli.benchmark_rows(METRICS), 16, file=out)
    text = out.getvalue()
    for header in ("benchmark", "questions", "avg@16", "maj@16", "pass@16"):
        assert header in text
    lines = {line.split()[1]: line for line in text.splitlines() if "gpqa" in line or ALL in line}
    assert "25.0" in lines["gpqa"] and "50.0" in lines["gpqa"]
    assert "37.5" in lines[ALL] and "75.0" in lines[ALL]


def test_question_records_with_and_without_samples():
    questions = [Question("q1", "t", "math", "7", "b"), Question("q2", "t", "choice", "A", "b")]
    results = [QuestionResult("q1", "b", (True, False), True),
               QuestionResult("q2", "b", (False, False), False)]
    rollouts = [fake_rollout("q1", 0, "\\boxed{7}"), fake_rollout("q2", 0, "x", "length"),
                fake_rollout("q1", 1, "\\boxed{8}", "length"), fake_rollout("q2", 1, "y", "length")]
    records = eval_cli.question_records(questions, results, rollouts, save_samples=False)
    assert records == [
        {"id": "q1", "source": "b", "answer": "7", "correct": [True, False], "majority_correct": True,
         "truncated": 1},
        {"id": "q2", "source": "b", "answer": "A", "correct": [False, False], "majority_correct": False,
         "truncated": 2},
    ]
    with_samples = eval_cli.question_records(questions, results, rollouts, save_samples=True)
    assert with_samples[0]["samples"] == [{"text": "\\boxed{7}", "finish_reason": "stop"},
                                          {"text": "\\boxed{8}", "finish_reason": "length"}]


def test_report_is_written_atomically_as_json(tmp_path):
    rows = eval_cli.benchmark_rows(METRICS)
    report = eval_cli.build_report({"k": 16}, METRICS, rows, [{"id": "q"}], {"evaluated": 4},
                                   {"generate": 1.23456})
    path = eval_cli.write_json(report, tmp_path / "sub" / "r.json")
    back = json.loads(path.read_text())
    assert back["benchmarks"]["gpqa"] == {"questions": 2, "avg@k": 0.25, "maj@k": 0.5, "pass@k": 0.5}
    assert back["benchmarks"][ALL]["questions"] == 4 and back["metrics"] == METRICS
    assert back["timing_s"] == {"generate": 1.235} and back["settings"] == {"k": 16}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_default_out_beside_the_model_or_in_the_working_directory(tmp_path, monkeypatch):
    model = tmp_path / "ckpts" / "step_00000010"
    model.mkdir(parents=True)
    assert eval_cli.default_out(model) == tmp_path / "ckpts" / "step_00000010.eval.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(eval_cli.os, "access", lambda path, mode: False)  # a read-only model directory
    assert eval_cli.default_out(model) == tmp_path / "step_00000010.eval.json"


def test_model_kind_from_its_files(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "mc").mkdir()
    (tmp_path / "mc" / "harmony.json").write_text("{}")
    assert eval_cli.detect_model_kind(tmp_path / "hf") == "hf"
    assert eval_cli.detect_model_kind(tmp_path / "mc") == "mcore"
    assert eval_cli.tokenizer_dir(tmp_path / "mc", "mcore") == tmp_path / "mc" / "hf"
    with pytest.raises(EvalInputError, match="neither an HF model directory"):
        eval_cli.detect_model_kind(tmp_path)


def test_benchmarks_named_by_source_or_file_and_ids_unique_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", QUESTIONS)
    b = write_jsonl(tmp_path / "my_bench.jsonl", [{**QUESTIONS[0], "id": "x1", "source": ""}])
    bench = eval_cli.load_benchmarks([a, b], skip_bad_rows=False)
    assert [q.source for q in bench.questions] == ["arith", "arith", "quiz", "quiz", "my_bench"]
    assert [q.qid for q in bench.labelled] == ["m1", "m2", "c1", "x1"]
    with pytest.raises(EvalInputError, match=r"'m1' is in both .*a.jsonl and .*again.jsonl"):
        again = write_jsonl(tmp_path / "again.jsonl", QUESTIONS[:1])
        eval_cli.load_benchmarks([a, again], skip_bad_rows=False)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """Enough of an HF directory for the checks that run before any model is loaded."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path / "model"


def test_bad_row_exits_2_naming_file_row_and_field(tmp_path, fake_model, capsys):
    bad = {k: v for k, v in QUESTIONS[1].items() if k != "question"}
    data = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], bad, QUESTIONS[2]])
    assert eval_cli.main(["--model", str(fake_model), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err and "field 'question'" in err


def test_skipped_rows_are_reported(tmp_path, capsys):
    bad = {k: v for k, v in QUESTIONS[1].items() if k != "question"}
    data = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], bad])
    bench = eval_cli.load_benchmarks([data], skip_bad_rows=True)
    eval_cli.report_loads(bench)
    assert len(bench.questions) == 1 and len(bench.skipped) == 1
    err = capsys.readouterr().err
    assert "skipped 1 bad rows" in err and "line 2, field 'question'" in err


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--data", "{data}", "--k", "0"], "--k must be >= 1"),
    (["--data", "{unlabelled}"], "no question with a ground-truth answer"),
    (["--data", "{data}", "--out", "{tmp}"], "cannot write there"),
])
def test_input_errors_exit_2(tmp_path, fake_model, capsys, argv, message):
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    unlabelled = write_jsonl(tmp_path / "u.jsonl", QUESTIONS[3:])
    argv = [a.format(data=data, unlabelled=unlabelled, tmp=tmp_path) for a in argv]
    assert eval_cli.main(["--model", str(fake_model), *argv]) == 2
    assert message in capsys.readouterr().err


def test_prompt_over_the_limit_exits_2_naming_the_question(tmp_path, fake_model, capsys):
    from harmony_mcore.tiny import train_tokenizer

    train_tokenizer(fake_model)
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    assert eval_cli.main(["--model", str(fake_model), "--data", str(data), "--max-prompt-tokens", "8"]) == 2
    assert "question 'm1'" in (err := capsys.readouterr().err) and "raise --max-prompt-tokens" in err


# ------------------------------------------------------------------ end to end (two vLLM runs, ~2 min)


def run_eval(model: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user runs it (vLLM state stays out of the test process)."""
    argv = [sys.executable, "-m", "harmony_mcore", "eval", "--model", str(model), "--data", str(data),
            "--k", "2", "--max-tokens", "16", "--dtype", "float32", "--seed", "3", "--save-samples",
            "--out", str(out)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict]]:
    """The same tiny random model evaluated from its HF directory and from an mcore conversion of it."""
    from harmony_mcore.dist import spawn_gloo
    from harmony_mcore.mcore.convert import hf_to_mcore_worker
    from harmony_mcore.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("eval_cli")
    hf = make_tiny_hf_model(root / "hf", "qwen3")
    spawn_gloo(1, hf_to_mcore_worker, str(hf), str(root / "mcore"), 1, 1, None, 128)
    data = write_jsonl(root / "questions.jsonl", QUESTIONS)
    runs = {}
    for kind in ("hf", "mcore"):
        proc = run_eval(root / kind, data, root / f"{kind}.json")
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[kind] = (proc, json.loads((root / f"{kind}.json").read_text()))
    return runs


@pytest.mark.slow
@pytest.mark.stack
def test_end_to_end_metrics_per_benchmark_and_table(tiny_runs):
    from harmony_mcore.runtime import local_gpus

    proc, report = tiny_runs["hf"]
    assert set(report["benchmarks"]) == {"arith", "quiz", ALL}
    for name, expected in (("arith", 2), ("quiz", 1), (ALL, 3)):
        metrics = report["benchmarks"][name]
        assert metrics["questions"] == expected
        assert all(0.0 <= metrics[m] <= 1.0 for m in ("avg@k", "maj@k", "pass@k"))
        assert metrics["maj@k"] <= metrics["pass@k"] and metrics["avg@k"] <= metrics["pass@k"]
    assert report["counts"] | {"response_tokens": 0, "truncated_samples": 0} == {
        "loaded": 4, "skipped_rows": 0, "unlabelled": 1, "evaluated": 3, "samples": 6, "response_tokens": 0,
        "truncated_samples": 0}
    assert [q["id"] for q in report["questions"]] == ["m1", "m2", "c1"]
    assert all(len(q["correct"]) == 2 and len(q["samples"]) == 2 for q in report["questions"])
    assert report["settings"] | {"model": "", "data": []} == {
        "model": "", "model_kind": "hf", "data": [], "k": 2, "temperature": 0.8, "top_p": 0.95,
        "max_tokens": 16, "max_prompt_tokens": 2048, "prompt_style": "base", "seed": 3, "dtype": "float32",
        "tp": 1, "gpu_memory_utilization": 0.1, "eval_step": -1, "device": "cuda" if local_gpus() else "cpu"}
    for header in ("benchmark", "avg@2", "maj@2", "pass@2", "arith", "quiz", ALL):
        assert header in proc.stdout
    assert "1 questions have no answer" in proc.stderr


@pytest.mark.slow
@pytest.mark.stack
def test_mcore_checkpoint_gives_identical_results_to_its_hf_model(tiny_runs):
    hf, mcore = tiny_runs["hf"][1], tiny_runs["mcore"][1]
    assert mcore["settings"]["model_kind"] == "mcore"
    assert mcore["timing_s"]["export"] > 0
    assert mcore["metrics"] == hf["metrics"] and mcore["benchmarks"] == hf["benchmarks"]
    assert mcore["questions"] == hf["questions"]  # the very same samples, text for text
