"""Bad input, as a new user gives it: every case of docs/reliability.md, with the message and exit status the user
sees. Fast: no Ray, no vLLM, no worker process (the trainer's Ray start is replaced by a tripwire)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from harmony_mcore import cli, plan
from harmony_mcore.config import ConfigError, load_config
from harmony_mcore.data import load_questions
from harmony_mcore.data import cli as data_cli
from harmony_mcore.data.errors import DataError
from harmony_mcore.data.verl import write_verl_parquet
from harmony_mcore.labels import AnswerSample, LabelConfig, label_batch
from harmony_mcore.labels.answers import MAX_ANSWER_CHARS, extract_answer, normalize_math
from harmony_mcore.labels.cli import main as label_main
from harmony_mcore.mcore.checkpoint import CheckpointMeta, write_manifest
from harmony_mcore.records import REFRAME, SOLVER, Question
from harmony_mcore.weights.arch import ArchSpec
from harmony_mcore.weights.table import expected_hf_names
from harmony_mcore.weights.validate import expected_hf_shape

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "cpu_tiny.yaml"
RECIPE = REPO / "configs" / "recipes" / "qwen3_8b_base_math500_1x8.yaml"

# A Qwen3 of 4 heads / 2 KV heads, 2 layers, vocab 250 (padded to 256), 512 positions.
HF_CONFIG = {"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 250,
             "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
             "hidden_act": "silu", "torch_dtype": "float32"}


def write_hf_dir(path: Path, config: dict | None = None, *, wrong_shape: bool = False) -> Path:
    """An HF directory the pre-start checks accept: config, a tokenizer file, zero weights of the right shapes."""
    config = config or HF_CONFIG
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text("{}")
    arch = ArchSpec.from_hf_config(config)
    tensors = {name: torch.zeros(expected_hf_shape(name, arch)) for name in expected_hf_names(arch)}
    if wrong_shape:
        tensors["model.norm.weight"] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def write_checkpoint(path: Path, extra: dict | None = None, padded_vocab: int = 256) -> Path:
    """The metadata of a harmony_mcore checkpoint (harmony.json, dist/, hf/, manifest.json) of HF_CONFIG's model."""
    (path / "dist").mkdir(parents=True)
    (path / "hf").mkdir()
    (path / "hf" / "config.json").write_text(json.dumps(HF_CONFIG))
    (path / "hf" / "tokenizer_config.json").write_text("{}")
    meta = CheckpointMeta(ArchSpec.from_hf_config(HF_CONFIG), padded_vocab, "float32", extra or {})
    (path / "harmony.json").write_text(meta.to_json())
    write_manifest(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


QUESTIONS = [{"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1), "answer_type": "math",
              "source": "t"} for i in range(8)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {"root": root, "hf": write_hf_dir(root / "hf"), "bad_shape": write_hf_dir(root / "bad", wrong_shape=True),
            "data": write_jsonl(root / "q.jsonl", QUESTIONS)}


class RayStarted(Exception):
    """The trainer got past every input check (the tripwire that replaces start_ray here)."""


@pytest.fixture
def train_cli(inputs, tmp_path, monkeypatch, capsys):
    """`harmony-mcore train --config cpu_tiny.yaml <valid model, data, run_dir> *args` in this process:
    (exit status, stderr). Reaching start_ray raises RayStarted."""
    import harmony_mcore.train as train_module

    def no_ray(cfg):
        raise RayStarted

    monkeypatch.setattr(train_module, "start_ray", no_ray)

    def run(*args: str, config: Path = TINY) -> tuple[int, str]:
        argv = ["train", "--config", str(config), f"model.hf_path={inputs['hf']}", f"train.data={inputs['data']}",
                f"logging.run_dir={tmp_path / 'run'}", *args]
        code = cli.main(argv)
        return code, capsys.readouterr().err

    return run


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------ config files


@pytest.mark.parametrize("content, message", [
    ("model:\n  hf_path: [unclosed\n", "not valid YAML at line 3, column 1"),
    ("- a\n- b\n", "expected a mapping of config sections"),
    (b"model:\n  hf_path: \xff\n", "not UTF-8 text"),
    ("model: 5\n", "model: must be a section of keys"),
    ("rollout:\n  solver_prompt: 'Q: {foo}'\n", "rollout.solver_prompt: unknown placeholder {foo}"),
    ("rollout:\n  solver_prompt: 'Q: {} {question}'\n", "rollout.solver_prompt: not a valid template"),
    ("rollout:\n  solver_prompt: 'Answer the question.'\n", "rollout.solver_prompt: must contain the {question}"),
])
def test_bad_config_files(train_cli, tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = train_cli(config=config)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_missing_config_file(train_cli, tmp_path):
    code, err = train_cli(config=tmp_path / "nope.yaml")
    assert code == 2 and "nope.yaml: config file not found" in one_line_error(err)


# --------------------------------------------------------------------------------- keys, types and ranges


@pytest.mark.parametrize("override, message", [
    ("parallel.tpp=2", "parallel.tpp: Key 'tpp' not in 'ParallelConfig'"),
    ("parallel.tp=two", "parallel.tp: Value 'two' of type 'str' could not be converted to Integer"),
    ("parallel=3", "parallel: must be a section of keys"),
    ("tp", "override 'tp' is not of the form key=value"),
    ("=5", "override '=5' is not of the form key=value"),
    ("grpo.kl_type=k2", "grpo.kl_type: Invalid value 'k2'"),
    ("eval.top_p=1.5", "eval.top_p: must be in (0, 1], got 1.5"),
    ("eval.temperature=-1", "eval.temperature: must be > 0, got -1.0"),
    ("optim.adam_beta1=1.5", "optim.adam_beta1: must be in [0, 1), got 1.5"),
    ("optim.adam_beta2=1", "optim.adam_beta2: must be in [0, 1), got 1.0"),
    ("optim.weight_decay=-3", "optim.weight_decay: must be >= 0, got -3.0"),
    ("optim.adam_eps=0", "optim.adam_eps: must be > 0, got 0.0"),
    ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
    ("rollout.temperature=inf", "rollout.temperature: must be a finite number, got inf"),
    ("rollout.top_p=0", "rollout.top_p: must be in (0, 1], got 0.0"),
    ("rollout.gpu_memory_utilization=1", "rollout.gpu_memory_utilization: must be in (0, 1)"),
    ("train.seed=-1", "train.seed: must be >= 0, got -1"),
    ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("eval.k=0", "eval.k: must be >= 1, got 0"),
    ("eval.max_response_tokens=-1", "eval.max_response_tokens: must be >= 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last: must be >= 1, got 0"),
    ("ray.num_cpus=0", "ray.num_cpus: must be >= 1 (or null)"),
    ("grpo.clip_high=-1", "grpo.clip_high: must be >= 0, got -1.0"),
    ("grpo.dual_clip=0.5", "grpo.dual_clip: must be > 1 (or null)"),
    ("labels.view_weights=[1,nan]", "labels.view_weights: must hold one positive weight per view (2), got [1.0, nan]"),
    ("labels.prior_pi=1.5", "labels.prior_pi: must be in (0, 1), got 1.5"),
    ("labels.smoothing=-1", "labels.smoothing: must be >= 0, got -1.0"),
    ("rewards.soft_rank_top=0", "rewards.soft_rank_top: must be >= 1, got 0"),
    ("collapse.max_empty_share=2", "collapse.max_empty_share: must be in [0, 1] (or null), got 2.0"),
    ("parallel.dp=3", "train.questions_per_step: 4 questions do not split over parallel.dp=3 ranks"),
    ("model.preset=gpt5", "model.preset: unknown preset 'gpt5'"),
    ("parallel.tp=", "parallel.tp: Incompatible value 'None' for field of type 'int' (an empty `key=` override is "
                     "null)"),
    ("train.max_steps=1.5", "train.max_steps: Value '1.5' of type 'float' could not be converted to Integer"),
    ("rollout.enforce_eager=maybe", "rollout.enforce_eager: Value 'maybe' is not a valid bool"),
    ("model.dtype=float16", "model.dtype: Invalid value 'float16', expected one of ['float32', 'bfloat16']"),
    ("rollout.strategies=[]", "rollout.strategies: must name at least one reframing strategy"),
    ("rollout.seed=-1", "rollout.seed: must be >= 0, got -1"),
    ("labels.verify_timeout_s=0", "labels.verify_timeout_s: must be >= 1, got 0"),
    ("collapse.patience=0", "collapse.patience: must be >= 1, got 0"),
    ("grpo.updates_per_step=3", "grpo.updates_per_step: 32 sequences per data-parallel rank do not split into 3"),
])
def test_bad_values_exit_2_naming_the_key(train_cli, tmp_path, override, message):
    code, err = train_cli(override)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- layout against the model


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3"], "parallel.tp: impossible layout for {hf}/config.json: parallel.tp=3 does not divide the 4 "
                        "attention heads"),
    (["parallel.tp=1", "parallel.pp=3"], "parallel.pp: impossible layout for {hf}/config.json: parallel.pp=3 does "
                                         "not divide the 2 layers"),
    (["rollout.engine_tp=3"], "rollout.engine_tp: impossible layout for {hf}/config.json: rollout.engine_tp=3 "
                              "does not divide the 4 attention heads"),
    (["rollout.max_response_tokens=200"], "rollout.max_prompt_tokens: impossible layout for {hf}/config.json: "
                                          "rollout.max_prompt_tokens + rollout.max_response_tokens = 584 exceeds "
                                          "the model's 512 positions"),
])
def test_impossible_layouts_exit_2_before_anything_starts(train_cli, inputs, tmp_path, overrides, message):
    code, err = train_cli(*overrides)
    assert code == 2 and message.format(hf=inputs["hf"]) in one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_impossible_layout_of_a_preset_at_config_time():
    with pytest.raises(ConfigError, match=r"^parallel\.tp: impossible layout for preset qwen3-8b: parallel\.tp=3"):
        load_config(RECIPE, ["parallel.tp=3"])


def test_layout_refusal_from_the_command_line_takes_seconds():
    """The issue's case: `parallel.tp=3` exited 1 with a traceback after Ray started; now 2 before it."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harmony_mcore", "train", "--config", str(RECIPE), "parallel.tp=3"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert one_line_error(done.stderr).startswith("error: parallel.tp: impossible layout for preset qwen3-8b")
    assert time.perf_counter() - start < 60


# ---------------------------------------------------------------------------------- files that must exist


@pytest.mark.parametrize("override, message", [
    ("model.hf_path={root}/absent", "model.hf_path: {root}/absent does not exist"),
    ("model.hf_path={data}", "model.hf_path: {data} is not a directory"),
    ("model.hf_path={root}", "model.hf_path: {root} has no config.json"),
    ("model.hf_path={bad_shape}", "model.hf_path: {bad_shape}: tensor 'model.norm.weight' has shape (3,)"),
    ("model.hf_path=''", "model.hf_path: set model.hf_path (or model.mcore_path / model.preset)"),
    ("model.hf_path=", "model.hf_path: Incompatible value 'None' for field of type 'str' (an empty `key=` override "
                       "is null; write key=\"''\" for an empty text)"),
    ("train.data={root}/absent.jsonl", "train.data: {root}/absent.jsonl does not exist"),
    ("train.data=''", "train.data: set the question file to train on"),
    ("eval.data={root}/absent.jsonl", "eval.data: {root}/absent.jsonl does not exist"),
    ("logging.run_dir={data}", "logging.run_dir: {data} exists and is not a directory"),
])
def test_missing_files_are_named_by_key(train_cli, inputs, override, message):
    code, err = train_cli(override.format(**inputs))
    assert code == 2 and message.format(**inputs) in one_line_error(err)


def test_preset_alone_cannot_train(train_cli):
    code, err = train_cli("model.hf_path=''", "model.preset=qwen3-0.6b", "rollout.max_prompt_tokens=8")
    assert code == 2 and "model.hf_path: training needs weights" in one_line_error(err)


@pytest.mark.parametrize("config_json, message", [
    ("{not json", "model.hf_path: {path}/config.json is not valid JSON"),
    (json.dumps({**HF_CONFIG, "model_type": "gpt2"}), "model.hf_path: {path}/config.json: config.model_type: "
                                                       "unknown architecture 'gpt2'"),
    (json.dumps([1, 2]), "model.hf_path: {path}/config.json must hold a JSON object"),
])
def test_unusable_hf_config(train_cli, tmp_path, config_json, message):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(config_json)
    code, err = train_cli(f"model.hf_path={path}")
    assert code == 2 and message.format(path=path) in one_line_error(err)


def test_mcore_path_refusals(train_cli, tmp_path):
    good = write_checkpoint(tmp_path / "ckpt")
    partial = write_checkpoint(tmp_path / "ckpt2.partial")
    damaged = write_checkpoint(tmp_path / "damaged")
    (damaged / "harmony.json").write_text("{trunc")
    no_dist = write_checkpoint(tmp_path / "no_dist")
    (no_dist / "dist").rmdir()
    cases = [
        (partial, f"model.mcore_path: {partial} is an unfinished write (.partial)"),
        (tmp_path / "absent", f"model.mcore_path: {tmp_path / 'absent'} does not exist"),
        (damaged, f"model.mcore_path: {damaged / 'harmony.json'} is not valid JSON"),
        (no_dist, f"model.mcore_path: {no_dist} is an incomplete checkpoint (no dist/ directory)"),
    ]
    for path, message in cases:
        code, err = train_cli("model.hf_path=''", f"model.mcore_path={path}")
        assert code == 2 and message in one_line_error(err), path
    code, err = train_cli("model.hf_path=''", f"model.mcore_path={good}", "model.vocab_multiple=512")
    assert code == 2 and (f"model.mcore_path: {good}: checkpoint does not match the model: padded_vocab_size: "
                          "checkpoint 256 != model 512 (model.vocab_multiple=512)") in one_line_error(err)
    with pytest.raises(RayStarted):  # a complete checkpoint that fits passes every check
        train_cli("model.hf_path=''", f"model.mcore_path={good}")


# --------------------------------------------------------------------------- training data, run directory


def test_bad_data_row_is_named(train_cli, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [*QUESTIONS[:3], {**QUESTIONS[3], "question": 5}])
    code, err = train_cli(f"train.data={data}")
    assert code == 2 and f"{data}, line 4, field 'question': expected a string, got int" in one_line_error(err)


def test_fewer_questions_than_a_step(train_cli, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:3])
    code, err = train_cli(f"train.data={data}")
    assert code == 2
    assert "train.questions_per_step: train.data has 3 questions, fewer than train.questions_per_step=4" in err


def test_a_refused_run_leaves_the_run_directory_untouched(train_cli, inputs, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("the refused run's config\n")
    code, err = train_cli(f"train.data={tmp_path / 'absent.jsonl'}")
    assert code == 2 and "train.data" in err
    # a resume refused because the model section changed since the checkpoint
    write_checkpoint(run / "checkpoints" / "step_00000002", extra={"step": 2, "model_hash": "0" * 16})
    code, err = train_cli("--resume")
    assert code == 2 and "the model section of the config changed" in one_line_error(err)
    assert (run / "config.yaml").read_text() == "the refused run's config\n"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


def test_resume_without_a_checkpoint_says_it_starts_fresh(inputs, tmp_path, monkeypatch, capsys):
    import harmony_mcore.train as train_module

    monkeypatch.setattr(train_module, "start_ray", lambda cfg: (_ for _ in ()).throw(RayStarted()))
    cfg = load_config(TINY, [f"model.hf_path={inputs['hf']}", f"train.data={inputs['data']}",
                             f"logging.run_dir={tmp_path / 'run'}"])
    with pytest.raises(RayStarted):
        train_module.train(cfg, resume=True)
    assert f"--resume: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting fresh from step 0" in \
        capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").is_file()  # written once every check passed


# ------------------------------------------------------------------------------------- answers, labeller


PATHOLOGICAL = {
    "5000 digits": "7" * 5000,
    "5000 digits, negative, leading zeros": "-" + "0" * 4000 + "7" * 90,
    "nested braces": "{" * 20_000 + "5" + "}" * 20_000,
    "a unit-like word run": "1 " + "a" * 100_000 + "!",
    "a megabyte": "x" * 1_000_000,
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_any_answer_normalises_quickly_and_never_raises(name):
    start = time.perf_counter()
    result = normalize_math(PATHOLOGICAL[name])
    assert time.perf_counter() - start < 1.0
    assert result == ("-" + "7" * 90 if name.startswith("5000 digits, negative") else "")


def test_the_issue_box_of_5000_digits_is_no_answer():
    assert normalize_math(extract_answer(r"so \boxed{" + "7" * 5000 + "}", "math")) == ""
    assert normalize_math("0" * 10 + "7" * (MAX_ANSWER_CHARS - 10)) == "7" * (MAX_ANSWER_CHARS - 10)


def test_labels_do_not_depend_on_one_bad_sample():
    def batch(bad: str) -> list[AnswerSample]:
        return ([AnswerSample("a", SOLVER, r"\boxed{5}"), AnswerSample("a", SOLVER, bad),
                 AnswerSample("a", REFRAME, r"\boxed{5}"), AnswerSample("b", SOLVER, r"\boxed{2}"),
                 AnswerSample("b", REFRAME, r"\boxed{2}")])

    with_bad = label_batch(batch(r"\boxed{" + "7" * 5000 + "}"), LabelConfig())
    with_none = label_batch(batch("no answer"), LabelConfig())
    assert with_bad.questions == with_none.questions and with_bad.diagnostics == with_none.diagnostics
    assert with_bad.questions["a"].label == "5"


def run_label(tmp_path: Path, rows: list | bytes, *options: str) -> tuple[int, str]:
    path = tmp_path / "samples.jsonl"
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        write_jsonl(path, rows)
    code = label_main(["label", "--input", str(path), "--output", str(tmp_path / "labels.jsonl"), *options])
    return code, path


ROWS = [{"question_id": 1, "view": "solver", "response": r"\boxed{5}"},
        {"question_id": 1, "view": "reframe", "response": r"\boxed{5}"}]


def test_label_file_with_pathological_answers_is_labelled(tmp_path, capsys):
    rows = [*ROWS, {"question_id": 1, "view": "solver", "response": r"\boxed{" + "7" * 5000 + "}"},
            '{"question_id": 2, "view": "solver", "answer": ' + "8" * 6000 + "}"]
    code, _ = run_label(tmp_path, rows)
    assert code == 0, capsys.readouterr().err
    labels = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [(row["question_id"], row["label"]) for row in labels] == [("1", "5"), ("2", "")]


@pytest.mark.parametrize("rows, options, message", [
    ([], (), "{path}: holds no samples (the file is empty)"),
    (b'{"question_id": 1, "view": "solver", "response": "\xff"}\n', (), "{path}, line 1: not valid UTF-8 text"),
    (ROWS, ("--lambda", "nan"), "bad option: labels.lam: must be >= 0, got nan"),
    (ROWS, ("--smoothing", "inf"), "bad option: labels.smoothing: must be >= 0, got inf"),
    (ROWS, ("--view-weights", "1,-1"), "bad option: labels.view_weights: must hold one positive weight per view"),
    ([*ROWS, "{oops"], (), "{path}, line 3: not valid JSON"),
])
def test_bad_label_inputs_exit_2(tmp_path, capsys, rows, options, message):
    code, path = run_label(tmp_path, rows, *options)
    assert code == 2 and message.format(path=path) in one_line_error(capsys.readouterr().err)


def test_label_refuses_missing_input_and_unwritable_output(tmp_path, capsys):
    write_jsonl(tmp_path / "s.jsonl", ROWS)
    assert label_main(["label", "--input", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "l")]) == 2
    assert "absent.jsonl: cannot read file: No such file or directory" in one_line_error(capsys.readouterr().err)
    out = tmp_path / "s.jsonl" / "labels.jsonl"  # under a file
    assert label_main(["label", "--input", str(tmp_path / "s.jsonl"), "--output", str(out)]) == 2
    assert f"--output {out}: cannot write there" in one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------- data files


def test_data_prepare_refusals_exit_2(tmp_path, capsys):
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"id": "a", "question": "q", "source": "t", "answer_type": "math", "answer": '
                    + "7" * 5000 + "}\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "a", "question": "caf\xe9", "source": "t", "answer_type": "math", "answer": "1"}\n')
    good = write_jsonl(tmp_path / "good.jsonl", QUESTIONS)
    cases = [
        (huge, tmp_path / "o.jsonl", f"{huge}, line 1: invalid JSON: a number too long to read"),
        (latin, tmp_path / "o.jsonl", f"{latin}: not valid UTF-8 text"),
        (tmp_path / "absent.jsonl", tmp_path / "o.jsonl", "absent.jsonl: no such file or directory"),
        (good, good / "o.jsonl", "error: cannot write"),
    ]
    for source, output, message in cases:
        assert data_cli.main(["prepare", "--input", str(source), "--output", str(output)]) == 2, source
        assert message in one_line_error(capsys.readouterr().err)


def test_verl_null_ground_truth_is_unlabeled_and_a_missing_one_is_refused(tmp_path):
    """verl.py's format: `reward_model.ground_truth` must be present; null marks an unlabeled question (as a null
    `answer` does in the project format): it loads without ground truth, used for neither metrics nor eval.
    (In Parquet a struct field absent from one row is null: only a file without the field is "missing".)"""
    path = tmp_path / "v.parquet"
    write_verl_parquet([Question("a", "1+1?", "math", "2", "s"), Question("b", "2+2?", "math", None, "s")], path)
    assert [q.ground_truth for q in load_questions(path)] == ["2", None]
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["reward_model"] = {"style": "rule"}
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"v\.parquet, row 1, field 'reward_model\.ground_truth': missing"):
        load_questions(path)


# --------------------------------------------------------------------------------------------- planner


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node", "8", "--gpu-mem-gib", "nan"],
     "a finite --gpu-mem-gib > 0 (got --nodes 1 --gpus-per-node 8 --gpu-mem-gib nan)"),
    (["--gpus-per-node", "8", "--gpu-mem-gib", "inf"], "--gpu-mem-gib inf)"),
    (["--gpus-per-node", "0"], "need --nodes >= 1, --gpus-per-node >= 1"),
    (["--gpus-per-node", "8", "parallel.tp=3"], "parallel.tp: impossible layout for preset qwen3-8b"),
])
def test_plan_refusals(capsys, args, message):
    assert plan.main(["--config", str(RECIPE), "--nodes", "1", *args]) == 2
    assert message in one_line_error(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ eval


@pytest.mark.parametrize("model, args, message", [
    ("absent", [], "--model {tmp}/absent: does not exist"),
    ("ckpt.partial", [], "--model {tmp}/ckpt.partial: an unfinished write (.partial)"),
    ("damaged", [], "{tmp}/damaged/harmony.json is damaged (JSONDecodeError"),
    ("no_dist", [], "{tmp}/no_dist: incomplete checkpoint (no dist/ directory)"),
    ("ckpt", ["--temperature", "inf"], "--temperature must be a number >= 0"),
    ("ckpt", ["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1]"),
    ("ckpt", ["--dtype", "float8"], "--dtype must be one of auto, float32"),
])
def test_eval_refusals(tmp_path, capsys, model, args, message):
    from harmony_mcore import eval_cli

    write_checkpoint(tmp_path / "ckpt")
    write_checkpoint(tmp_path / "ckpt.partial")
    (write_checkpoint(tmp_path / "damaged") / "harmony.json").write_text("{")
    (write_checkpoint(tmp_path / "no_dist") / "dist").rmdir()
    data = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    argv = ["--model", str(tmp_path / model), "--data", str(data), "--out", str(tmp_path / "r.json"), *args]
    assert eval_cli.main(argv) == 2
    assert message.format(tmp=tmp_path) in one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------- conversion


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_mcore_to_hf_refusals(tmp_path, capsys):
    tool = load_tool("convert_mcore_to_hf")
    good = write_checkpoint(tmp_path / "ckpt")
    partial = write_checkpoint(tmp_path / "ckpt.partial")
    (write_checkpoint(tmp_path / "damaged") / "harmony.json").write_text("{")
    (write_checkpoint(tmp_path / "no_dist") / "dist").rmdir()
    out = str(tmp_path / "out")
    cases = [
        ([partial, out], f"--mcore {partial}: an unfinished write (.partial), not a complete checkpoint"),
        ([tmp_path / "damaged", out], f"{tmp_path}/damaged/harmony.json is damaged (JSONDecodeError"),
        ([tmp_path / "no_dist", out], f"{tmp_path}/no_dist: incomplete checkpoint (no dist/ directory)"),
        ([tmp_path / "absent", out], f"{tmp_path}/absent: not a harmony_mcore checkpoint (no harmony.json)"),
        ([good, good], f"{good}: output directory already exists (refusing to overwrite)"),
        ([good, good / "harmony.json" / "x"], f"--out {good}/harmony.json/x: cannot be created"),
        ([good, out, "--tp", "3"], "impossible parallel layout: --tp 3 does not divide the 4 attention heads"),
        ([good, out, "--tp", "0"], "--tp must be >= 1, got 0"),
        ([good, out, "--shard-gb", "nan"], "--shard-gb must be a finite number > 0, got nan"),
    ]
    for (mcore, output, *options), message in cases:
        assert tool.main(["--mcore", str(mcore), "--out", str(output), *options]) == 2, message
        assert message in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_convert_hf_to_mcore_refusals(inputs, tmp_path, capsys):
    tool = load_tool("convert_hf_to_mcore")
    hf, bad, out = inputs["hf"], inputs["bad_shape"], str(tmp_path / "out")
    cases = [
        ([tmp_path / "absent", out], f"{tmp_path}/absent/config.json: no config.json"),
        ([bad, out], f"{bad}: tensor 'model.norm.weight' has shape (3,)"),
        ([hf, out, "--tp", "3"], f"--hf {hf}: impossible parallel layout: --tp 3 does not divide the 4 attention"),
        ([hf, out, "--vocab-multiple", "0"], "--vocab-multiple must be >= 1, got 0"),
        ([hf, hf], f"{hf}: output directory already exists"),
        ([hf, hf / "config.json" / "x"], f"--out {hf}/config.json/x: cannot be created"),
    ]
    for (source, output, *options), message in cases:
        assert tool.main(["--hf", str(source), "--out", str(output), *options]) == 2, message
        assert message in one_line_error(capsys.readouterr().err)
