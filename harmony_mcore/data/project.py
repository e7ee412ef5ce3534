"""The project's question format: JSON lines, one object per question.

    {"id": str, "question": str, "answer": str | null, "answer_type": "math" | "choice", "source": str}

`answer` is the ground truth, used for metrics only (never for the reward); null marks genuinely unlabeled
test-time data. For "choice" questions the question text contains the lettered options and the answer is
one letter. Extra keys are allowed and ignored by `load_questions` (the synthetic warm-start file stores
its SFT targets there).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from harmony_mcore.data.errors import RowError
from harmony_mcore.data.fields import (
    Row,
    RowContext,
    answer_type_value,
    get_field,
    id_value,
    require_text,
    type_name,
    typed_answer,
)
from harmony_mcore.fsutil import atomic_file
from harmony_mcore.records import Question

PROJECT_FIELDS: tuple[str, ...] = ("id", "question", "answer", "answer_type", "source")


def question_to_record(question: Question) -> dict[str, object]:
    """The project-format object of one question."""
    return {
        "id": question.qid,
        "question": question.text,
        "answer": question.ground_truth,
        "answer_type": question.answer_type,
        "source": question.source,
    }


def question_from_record(row: Row, ctx: RowContext) -> Question:
    """Parse one project-format object. Every key is required; `answer` may be null, not absent."""
    del ctx  # the record carries its own id and source
    id_key, raw_id = get_field(row, "id")
    type_key, raw_type = get_field(row, "answer_type")
    answer_type = answer_type_value(raw_type, type_key)
    answer_key, raw_answer = get_field(row, "answer")
    if raw_answer is not None and not isinstance(raw_answer, str):
        raise RowError(answer_key, f"expected a string or null, got {type_name(raw_answer)}")
    source_key, source = get_field(row, "source")
    if not isinstance(source, str):
        raise RowError(source_key, f"expected a string, got {type_name(source)}")
    return Question(
        qid=id_value(raw_id, id_key),
        text=require_text(row, "question"),
        answer_type=answer_type,
        ground_truth=None if raw_answer is None else typed_answer(raw_answer, answer_key, answer_type),
        source=source,
    )


def write_jsonl(records: Iterable[Mapping[str, object]], path: Path | str) -> int:
    """Write objects as JSON lines (UTF-8, unescaped), atomically; returns the number written."""
    count = 0
    with atomic_file(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def check_unique_ids(questions: Iterable[Question]) -> None:
    """ValueError naming the first id that occurs twice."""
    seen: set[str] = set()
    for question in questions:
        if question.qid in seen:
            raise ValueError(f"duplicate question id {question.qid!r}")
        seen.add(question.qid)


def write_questions(
    questions: Iterable[Question],
    path: Path | str,
    extra: Iterable[Mapping[str, object]] | None = None,
) -> int:
    """Write questions in the project format; `extra` (parallel to `questions`) adds keys to each line.

    Refuses duplicate ids, which `load_questions` would reject. Returns the number of lines written.
    """
    questions = list(questions)
    check_unique_ids(questions)
    records = [question_to_record(question) for question in questions]
    if extra is not None:
        extras = list(extra)
        if len(extras) != len(records):
            raise ValueError(f"extra has {len(extras)} entries for {len(records)} questions")
        clashes = sorted({key for more in extras for key in more} & set(PROJECT_FIELDS))
        if clashes:
            raise ValueError(f"extra keys {clashes} would overwrite project fields")
        records = [{**record, **more} for record, more in zip(records, extras, strict=True)]
    return write_jsonl(records, path)
