"""JSON-lines files of rollouts (input of the offline labeller, dumped by the trainer) and of labels.

`write_samples` / `read_samples` round-trip `AnswerSample`s; `write_labels` writes one step's labels.

Sample rows, one JSON object per line (blank lines skipped):
    question_id   string or integer, required
    view          one of the configured views, required
    answer        the final answer (string or number); used as is when present and not null
    response      the full response text; its final answer is extracted when `answer` is absent
    ground_truth  optional, string or number (diagnostics only)
    answer_type   optional, "math" or "choice" (default: the caller's)
Label rows, one per question in sorted question id order:
    question_id, label ("" when empty), scores {answer: score} (view 0's scores, classes in canonical order),
    targets {view: answer} (the label for every view, except under co_reward), counts {view: {answer: count}},
    samples {view: number of samples}, ground_truth (normalised, or null), correct (the label is the ground
    truth; null without one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from harmony_mcore.data.errors import DataError, RowError
from harmony_mcore.labels.answers import ANSWER_TYPES
from harmony_mcore.labels.batch import AnswerSample, BatchLabels
from harmony_mcore.records import AnswerType


def _text(row: dict[str, Any], key: str, *, number_ok: bool) -> str | None:
    """row[key] as a string (numbers converted when number_ok); None if absent or null."""
    value = row.get(key)
    if value is None or isinstance(value, str):
        return value
    if number_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    expected = "a string or a number" if number_ok else "a string"
    raise RowError(key, f"must be {expected}, got {type(value).__name__}")


def _sample(row: Any, views: Sequence[str], default_type: AnswerType) -> AnswerSample:
    if not isinstance(row, dict):
        raise RowError(None, f"must be a JSON object, got {type(row).__name__}")
    qid = row.get("question_id")
    if qid is None:
        raise RowError("question_id", "is required")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise RowError("question_id", f"must be a string or an integer, got {type(qid).__name__}")
    view = _text(row, "view", number_ok=False)
    if view is None:
        raise RowError("view", "is required")
    if view not in views:
        raise RowError("view", f"unknown view {view!r}, expected one of {list(views)}")
    answer = _text(row, "answer", number_ok=True)
    response = _text(row, "response", number_ok=False)
    if response is None and "answer" not in row:
        raise RowError("response", "is required when the row has no 'answer'")
    answer_type = _text(row, "answer_type", number_ok=False) or default_type
    if answer_type not in ANSWER_TYPES:
        raise RowError("answer_type", f"must be one of {list(ANSWER_TYPES)}, got {answer_type!r}")
    return AnswerSample(
        qid=str(qid),
        view=view,
        text=response or "",
        answer=answer,
        answer_type=cast(AnswerType, answer_type),
        ground_truth=_text(row, "ground_truth", number_ok=True),
    )


# Python refuses int() of longer digit strings; such a JSON number is kept as its digits (an answer that long is
# unparseable for the labeller, not an unreadable file).
_MAX_INT_DIGITS = 4300


def _json_int(digits: str) -> int | str:
    return int(digits) if len(digits.lstrip("-")) <= _MAX_INT_DIGITS else digits


def read_samples(
    path: Path | str, views: Sequence[str], default_type: AnswerType = "math"
) -> list[AnswerSample]:
    """The samples of a JSON-lines file. Raises DataError naming the file, the line and the field at fault,
    or the file alone when it cannot be read or holds no sample.

    A row needs `response` unless it has an `answer` key (an explicit null answer is a sample without one).
    """
    samples = []
    try:
        lines = open(path, "rb")  # decoded line by line, so that a bad byte is reported with its line
    except OSError as err:
        raise DataError(path, f"cannot read file: {err.strerror or err}") from None
    with lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    path, f"not valid UTF-8 text ({err.reason} at byte {err.start} of the line)", row=f"line {number}"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_int=_json_int)
            except json.JSONDecodeError as err:
                raise DataError(path, f"not valid JSON ({err.msg})", row=f"line {number}") from None
            try:
                samples.append(_sample(row, views, default_type))
            except RowError as err:
                raise DataError.from_row_error(path, f"line {number}", err) from None
    if not samples:
        raise DataError(path, "holds no samples (the file is empty)")
    return samples


def sample_row(sample: AnswerSample) -> dict[str, Any]:
    """The JSON-ready row of a sample, as `read_samples` reads it back (the trainer's rollout dump)."""
    row: dict[str, Any] = {"question_id": sample.qid, "view": sample.view, "response": sample.text}
    if sample.answer is not None:
        row["answer"] = sample.answer
    if sample.ground_truth is not None:
        row["ground_truth"] = sample.ground_truth
    return row | {"answer_type": sample.answer_type}


def write_samples(path: Path | str, samples: Iterable[AnswerSample], *, append: bool = False) -> None:
    """Write `sample_row`s as JSON lines (append: add to the file, e.g. one step after another)."""
    with open(path, "a" if append else "w", encoding="utf-8") as out:
        out.writelines(json.dumps(sample_row(sample), ensure_ascii=False) + "\n" for sample in samples)


def label_rows(labels: BatchLabels) -> Iterator[dict[str, Any]]:
    """One JSON-ready dict per question (fields in the module docstring)."""
    for qid, question in labels.questions.items():
        truth = question.ground_truth_class
        yield {
            "question_id": qid,
            "label": question.label,
            "scores": dict(zip(question.classes, question.scores[0], strict=True)),
            "targets": {view: question.target_answer(k) for k, view in enumerate(labels.views)},
            "counts": {
                view: {
                    answer: row[k]
                    for answer, row in zip(question.classes, question.counts, strict=True)
                    if row[k]
                }
                for k, view in enumerate(labels.views)
            },
            "samples": dict(zip(labels.views, question.totals, strict=True)),
            "ground_truth": question.ground_truth,
            "correct": None if question.ground_truth is None else truth >= 0 and question.targets[0] == truth,
        }


def write_labels(path: Path | str, labels: BatchLabels) -> None:
    """Write `label_rows` as JSON lines."""
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in label_rows(labels))
