"""Labels for one step, computed jointly by the data-parallel ranks.

The samples of one question may sit on different ranks. `label_batch` runs on every rank with that rank's own
samples and returns the same labels everywhere, equal to what one process holding all samples would compute:

1. each rank extracts and normalises its answers and shares, per question, the set of distinct normalised
   answers (plus answer type and ground truth): one all_gather_object of strings, no counts;
2. every rank merges the sets; question i (in sorted id order) is clustered into answer classes by rank
   i mod world, and the class assignments are shared: a second all_gather_object. One rank deciding each
   question makes a math-verify timeout unable to split the ranks;
3. each rank counts its samples per (question, class, view) and per (question, view) into one int64 vector
   laid out identically on every rank, and the vectors are summed: one all_reduce;
4. every rank scores and selects from the global counts (pure functions, same inputs, same labels).

The communication is linear in the number of distinct answers, the counting linear in the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from harmony_mcore.labels.answers import (
    ANSWER_TYPES,
    canonical_key,
    cluster_answers,
    extract_answer,
    find_class,
    normalize_answer,
    representatives,
)
from harmony_mcore.labels.batch import AnswerSample, BatchLabels, QuestionLabel
from harmony_mcore.labels.config import LabelConfig
from harmony_mcore.labels.diagnostics import label_diagnostics
from harmony_mcore.labels.selectors import score_answers, select_label
from harmony_mcore.records import AnswerType


@runtime_checkable
class Communicator(Protocol):
    """The two collectives the labeller needs, over the data-parallel ranks."""

    rank: int
    world_size: int

    def all_gather_object(self, obj: Any) -> list[Any]:
        """obj of every rank, in rank order."""

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over the ranks of a 1-D int64 array of the same length on every rank."""


class LocalCommunicator:
    """A single process: the collectives are identities."""

    rank = 0
    world_size = 1

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return values


class TorchCommunicator:
    """torch.distributed collectives over `group` (None: the default group), a gloo group: the counts are CPU
    data (the policy passes Megatron's gloo twin of the data-parallel group, on GPU clusters too)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device("cpu")

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(values).to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.cpu().numpy()


def communicator_for(group: dist.ProcessGroup | Communicator | None) -> Communicator:
    """A Communicator as is; a process group; None: the default group if initialised with > 1 ranks, else
    this process alone."""
    if isinstance(group, Communicator):
        return group
    if group is None and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return LocalCommunicator()
    return TorchCommunicator(group)


def sample_answer(sample: AnswerSample, letters: str) -> str:
    """The normalised answer of a sample ("" when it has none): its `answer` if given, else extracted."""
    raw = (
        sample.answer
        if sample.answer is not None
        else extract_answer(sample.text, sample.answer_type, letters)
    )
    return normalize_answer(raw, sample.answer_type, letters)


@dataclass(frozen=True)
class _QuestionAnswers:
    """A question's distinct normalised answers over all ranks, in canonical order, and what else is known."""

    answer_type: AnswerType
    ground_truth: str | None  # normalised
    answers: tuple[str, ...]


# Per question: (answer types, raw ground truths, distinct normalised answers), each sorted.
_LocalSummary = dict[str, tuple[tuple[AnswerType, ...], tuple[str, ...], tuple[str, ...]]]


def _summarise(
    samples: Sequence[AnswerSample], answers: Sequence[str], views: Sequence[str]
) -> tuple[str | None, _LocalSummary]:
    """This rank's step-1 message: (first input error or None, per-question summary)."""
    sets: dict[str, tuple[set[AnswerType], set[str], set[str]]] = {}
    error = None
    for i, (sample, answer) in enumerate(zip(samples, answers, strict=True)):
        if error is None and sample.view not in views:
            error = f"sample {i} (question {sample.qid!r}) has view {sample.view!r}, expected one of {views}"
        if error is None and sample.answer_type not in ANSWER_TYPES:
            error = f"sample {i} (question {sample.qid!r}) has answer_type {sample.answer_type!r}"
        types, truths, distinct = sets.setdefault(sample.qid, (set(), set(), set()))
        types.add(sample.answer_type)
        if sample.ground_truth is not None:
            truths.add(sample.ground_truth)
        if answer:
            distinct.add(answer)
    return error, {
        qid: (tuple(sorted(t)), tuple(sorted(g)), tuple(sorted(a))) for qid, (t, g, a) in sets.items()
    }


def _merge_summaries(
    messages: Sequence[tuple[str | None, _LocalSummary]], letters: str
) -> dict[str, _QuestionAnswers]:
    """Union of every rank's summary, by sorted question id. Raises the same error on every rank."""
    for rank, (error, _) in enumerate(messages):
        if error is not None:
            raise ValueError(f"label_batch input on rank {rank}: {error}")
    merged: dict[str, tuple[set[AnswerType], set[str], set[str]]] = {}
    for _, summary in messages:
        for qid, (types, truths, answers) in summary.items():
            all_types, all_truths, all_answers = merged.setdefault(qid, (set(), set(), set()))
            all_types.update(types)
            all_truths.update(truths)
            all_answers.update(answers)
    questions = {}
    for qid in sorted(merged):
        answer_types, ground_truths, distinct = merged[qid]
        if len(answer_types) != 1:
            raise ValueError(f"question {qid!r} has samples with answer types {sorted(answer_types)}")
        (answer_type,) = answer_types
        normalised_truths = sorted({normalize_answer(t, answer_type, letters) for t in ground_truths})
        if len(normalised_truths) > 1:
            raise ValueError(f"question {qid!r} has samples with ground truths {sorted(ground_truths)}")
        questions[qid] = _QuestionAnswers(
            answer_type,
            normalised_truths[0] if normalised_truths else None,
            tuple(sorted(distinct, key=canonical_key)),
        )
    return questions


def _cluster_share(
    questions: dict[str, _QuestionAnswers], comm: Communicator, cfg: LabelConfig
) -> dict[str, tuple[tuple[int, ...], int]]:
    """Step 2: per question, in `questions` order, (class of each distinct answer, class of the ground truth),
    computed by the question's owner rank."""
    mine = {}
    for qid in list(questions)[comm.rank :: comm.world_size]:
        question = questions[qid]
        classes = cluster_answers(
            question.answers, question.answer_type, cfg.verify_timeout_s, cfg.verify_max_chars
        )
        truth_class = find_class(
            question.ground_truth or "",
            question.answers,
            classes,
            question.answer_type,
            cfg.verify_timeout_s,
            cfg.verify_max_chars,
        )
        mine[qid] = (tuple(classes), truth_class)
    shared = {qid: part for shard in comm.all_gather_object(mine) for qid, part in shard.items()}
    return {qid: shared[qid] for qid in questions}


@dataclass(frozen=True)
class _CountLayout:
    """Where the counts sit in the vector every rank fills and all-reduces.

    Per question, in sorted id order: its A x K class counts (class-major: index class * K + view), then its K
    view totals. Identical on every rank, because it depends on the shared classes only.
    """

    offsets: dict[str, int]
    num_classes: dict[str, int]
    num_views: int
    size: int

    @classmethod
    def build(cls, clustering: dict[str, tuple[tuple[int, ...], int]], num_views: int) -> _CountLayout:
        offsets, num_classes, size = {}, {}, 0
        for qid, (classes, _) in clustering.items():
            offsets[qid], num_classes[qid] = size, max(classes, default=-1) + 1
            size += (num_classes[qid] + 1) * num_views
        return cls(offsets, num_classes, num_views, size)

    def count(
        self, samples: Sequence[AnswerSample], classes: Sequence[int], views: Sequence[str]
    ) -> np.ndarray:
        """(size,) int64 counts of these samples (class -1: counted in the view total only)."""
        view_index = {view: k for k, view in enumerate(views)}
        slots = []
        for sample, cls in zip(samples, classes, strict=True):
            base, k = self.offsets[sample.qid], view_index[sample.view]
            slots.append(base + self.num_classes[sample.qid] * self.num_views + k)
            if cls >= 0:
                slots.append(base + cls * self.num_views + k)
        return np.bincount(np.asarray(slots, dtype=np.int64), minlength=self.size).astype(np.int64)

    def block(self, counts: np.ndarray, qid: str) -> tuple[np.ndarray, np.ndarray]:
        """Question qid's class counts (A, K) and view totals (K,) in the reduced vector."""
        start = self.offsets[qid]
        block = counts[start : start + (self.num_classes[qid] + 1) * self.num_views].reshape(
            -1, self.num_views
        )
        return block[:-1], block[-1]


def _question_label(
    qid: str,
    question: _QuestionAnswers,
    clustering: tuple[tuple[int, ...], int],
    counts: np.ndarray,
    totals: np.ndarray,
    strategy: str,
    cfg: LabelConfig,
) -> QuestionLabel:
    """Step 4 for one question. counts: (A, K), totals: (K,)."""
    classes, truth_class = clustering
    scores = score_answers(counts, totals, strategy, cfg)
    class_totals = counts.sum(axis=1)
    return QuestionLabel(
        qid=qid,
        answer_type=question.answer_type,
        classes=tuple(representatives(question.answers, classes)),
        counts=tuple(map(tuple, counts.tolist())),
        totals=tuple(totals.tolist()),
        scores=tuple(map(tuple, scores.tolist())),
        targets=tuple(select_label(row, class_totals) for row in scores),
        ground_truth=question.ground_truth,
        ground_truth_class=truth_class,
    )


def label_batch(
    samples: Sequence[AnswerSample],
    cfg: LabelConfig,
    step: int = 0,
    group: dist.ProcessGroup | Communicator | None = None,
) -> BatchLabels:
    """Pseudo-labels of one step; call on every data-parallel rank with that rank's own samples.

    group: the data-parallel process group (or a `Communicator`); None: the default group when
    torch.distributed is initialised with more than one rank, else this process alone. Every rank gets the
    same `questions` and `diagnostics`; `sample_*` describe this rank's samples in input order. The selector
    is `cfg.strategy_at(step)`. Deterministic: no result depends on hash or arrival order.
    """
    comm = communicator_for(group)
    views, strategy = tuple(cfg.views), cfg.strategy_at(step)
    answers = [sample_answer(sample, cfg.choice_letters) for sample in samples]
    questions = _merge_summaries(
        comm.all_gather_object(_summarise(samples, answers, views)), cfg.choice_letters
    )
    clustering = _cluster_share(questions, comm, cfg)
    class_of = {
        qid: dict(zip(question.answers, clustering[qid][0], strict=True))
        for qid, question in questions.items()
    }
    sample_classes = [
        class_of[sample.qid].get(answer, -1) for sample, answer in zip(samples, answers, strict=True)
    ]
    layout = _CountLayout.build(clustering, len(views))
    counts = comm.all_reduce_sum(layout.count(samples, sample_classes, views))
    labels = {
        qid: _question_label(qid, question, clustering[qid], *layout.block(counts, qid), strategy, cfg)
        for qid, question in questions.items()
    }
    return BatchLabels(
        step=step,
        strategy=strategy,
        views=views,
        questions=labels,
        sample_qids=tuple(s.qid for s in samples),
        sample_views=tuple(s.view for s in samples),
        sample_classes=tuple(sample_classes),
        diagnostics=label_diagnostics(labels.values(), views),
    )
