"""Evaluation as the Self-Harmony line of papers reports it: k samples per question of the plain solver prompt
(temperature 0.8, top_p 0.95 by default), then per benchmark (question source):
    avg@k   mean over questions of the share of correct samples
    maj@k   share of questions whose majority answer class is correct (ties: canonical order)
    pass@k  share of questions with at least one correct sample
Correctness uses the labeller's own extraction, normalisation and equivalence classes (math-verify for maths,
letters for choices), so evaluation and training agree on what "the same answer" means.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from harmony_mcore.labels.answers import (
    canonical_key,
    cluster_answers,
    extract_answer,
    find_class,
    normalize_answer,
)
from harmony_mcore.labels.config import LabelConfig
from harmony_mcore.records import SOLVER, Question, Rollout


@dataclass(frozen=True)
class QuestionResult:
    qid: str
    source: str
    correct: tuple[bool, ...]  # per sample
    majority_correct: bool


def score_question(question: Question, texts: Sequence[str], cfg: LabelConfig) -> QuestionResult:
    """Correctness of each sample and of the majority answer against the question's ground truth."""
    kind, letters = question.answer_type, cfg.choice_letters
    answers = [normalize_answer(extract_answer(t, kind, letters), kind, letters) for t in texts]
    distinct = sorted({a for a in answers if a}, key=canonical_key)
    classes = cluster_answers(distinct, kind, cfg.verify_timeout_s, cfg.verify_max_chars)
    class_of = dict(zip(distinct, classes))
    gold = normalize_answer(question.ground_truth or "", kind, letters)
    gold_class = find_class(gold, distinct, classes, kind, cfg.verify_timeout_s, cfg.verify_max_chars)
    sample_classes = [class_of.get(a, -1) for a in answers]
    counts: dict[int, int] = defaultdict(int)
    for c in sample_classes:
        if c >= 0:
            counts[c] += 1
    majority = min(counts, key=lambda c: (-counts[c], c)) if counts else -1
    return QuestionResult(question.qid, question.source, tuple(gold_class >= 0 and c == gold_class
                                                                for c in sample_classes),
                          gold_class >= 0 and majority == gold_class)


def summarize(results: Sequence[QuestionResult], prefix: str = "eval") -> dict[str, float]:
    """avg@k / maj@k / pass@k over all questions and per source (e.g. eval/math500/avg@k)."""
    groups: dict[str, list[QuestionResult]] = {"": list(results)}
    for r in results:
        if r.source:
            groups.setdefault(r.source, []).append(r)
    out: dict[str, float] = {}
    for source, rs in groups.items():
        if not rs:
            continue
        key = f"{prefix}/{source}/" if source else f"{prefix}/"
        out[key + "avg@k"] = sum(sum(r.correct) / max(len(r.correct), 1) for r in rs) / len(rs)
        out[key + "maj@k"] = sum(r.majority_correct for r in rs) / len(rs)
        out[key + "pass@k"] = sum(any(r.correct) for r in rs) / len(rs)
        out[key + "questions"] = float(len(rs))
    return out


def score_questions(questions: Sequence[Question], rollouts: Sequence[Rollout], cfg: LabelConfig
                    ) -> list[QuestionResult]:
    """Per-question results of the solver-view rollouts (questions without ground truth are skipped)."""
    texts: dict[str, list[str]] = defaultdict(list)
    for r in rollouts:
        if r.view == SOLVER:
            texts[r.qid].append(r.text)
    return [score_question(q, texts[q.qid], cfg) for q in questions if q.ground_truth]


def score_rollouts(questions: Sequence[Question], rollouts: Sequence[Rollout], cfg: LabelConfig,
                   prefix: str = "eval") -> dict[str, float]:
    return summarize(score_questions(questions, rollouts, cfg), prefix)
