"""A procedural reasoning task for the embedded CPU demo: multi-step arithmetic word problems.

    Tom has 7 apples. He buys 5 more. He gives 3 away. How many apples does Tom have now?

A tiny model (a few M parameters) is warm-started on it with SFT, then improved by Self-Harmony test-time
RL. Everything is deterministic from the seed, the vocabulary is small (6 names, 6 objects, 3 phrasings
per operation) and texts are short (a prompt plus either response stays well under 200 tokens).

Each warm-start example has two SFT targets, one per Self-Harmony view:
- solver view:  "7 + 5 = 12. 12 - 3 = 9. \\boxed{9}"
- reframe view: three sections (harmony_mcore.records.REFRAME_SECTIONS), one per line:
      STRATEGY: Point-of-View Shift
      REWRITTEN PROBLEM: I have 7 apples. I buy 5 more. I give 3 away. How many apples do I have now?
      SOLUTION: 7 + 5 = 12. 12 - 3 = 9. \\boxed{9}
  The rewrite keeps every number of the computation and the answer and changes the surface, with one of
  the paper's strategies that can be done procedurally (see STRATEGIES).

`make_task` returns a warm-start set (with solutions, for SFT) and a test-time set of questions whose
arithmetic (start value and steps) never occurs in the warm-start set; the test set's ground truth is for
metrics only. The test set depends only on (seed, n_test, n_trap_test, difficulty), not on the warm-start
sizes. `write_task` writes both in the project JSONL format (the warm file adds solver_response,
reframe_response and strategy keys, read back by `read_warm_start`).

A second family, the *trapped* questions (source TRAP_SOURCE, off unless n_trap_warm / n_trap_test > 0), is a
controlled test of the mechanism Self-Harmony exists for, not evidence about real models. Each carries a
distractor: a count of the same objects that somebody else has, told right after the opening,

    Tom has 7 apples. Ann has 4 apples too. He buys 5 more. He gives 3 away.
    How many apples does Tom have now?

The right answer ignores it (7 + 5 - 3 = 9); the *spurious* answer runs the story from the distractor, the
most recently stated count (4 + 5 - 3 = 6): a recency slip that keeps the solution's shape (same steps, same
number of equations), so a small model can learn it as one decision. The warm-start corpus plants a
view-dependent bias (TrapMix, exact quotas over the trapped examples, drawn independently per view):
    solver view (original wording): spurious with share a (0.8), right 1 - a;
    reframe view: right with share d (0.5): "Focus on Constraints" restates the problem as its start value and
        ordered changes, which drops the distractor; spurious b (0.1): another strategy retells the distractor
        sentence and the solution starts from it; the rest e = 1 - d - b (0.4) are scattered slips (one
        equation off by 1..3, the answer neither right nor spurious).
With p_view(answer) these shares, the spurious answer wins the solver view's majority (a > 1 - a) and the
pooled vote (the arithmetic mean, a + b > (1 - a) + d), while the right answer has the higher harmonic mean
(2 (1 - a) d / (1 - a + d) > 2 a b / (a + b)): `planted_labels`. The pooled vote needs e > 0: with both
views' shares summing to 1, a + b > 1 - a + d means e > 1 - 2b - (2a - 1), i.e. the reframe view must put
mass on scattered answers that no selector can pick.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from harmony_mcore.data.fields import Row, RowContext, require_text
from harmony_mcore.data.loader import check_unique, convert_rows
from harmony_mcore.data.project import question_from_record, write_questions
from harmony_mcore.data.readers import RawRow, read_table
from harmony_mcore.labels.config import LabelConfig
from harmony_mcore.labels.selectors import score_answers
from harmony_mcore.records import REFRAME, REFRAME_SECTIONS, SOLVER, Question

SOURCE = "synthetic"
# Source and qid prefix of the trapped questions: their family in per-source metrics.
TRAP_SOURCE = "synthetic-trap"
FAMILIES: Mapping[str, str] = {SOURCE: "ordinary", TRAP_SOURCE: "trapped"}
WARM_FILE = "warm.jsonl"
TEST_FILE = "test.jsonl"

Op = Literal["add", "sub", "mul"]
Voice = Literal["third", "first"]
OPS: tuple[Op, ...] = get_args(Op)
SYMBOLS: Mapping[Op, str] = {"add": "+", "sub": "-", "mul": "*"}


# ----------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class Step:
    """One operation applied to the running count ("mul" multiplies by a small factor)."""

    op: Op
    operand: int

    def apply(self, value: int) -> int:
        if self.op == "add":
            return value + self.operand
        if self.op == "sub":
            return value - self.operand
        return value * self.operand


@dataclass(frozen=True)
class Problem:
    """The arithmetic of one word problem; two problems are the same problem iff start and steps agree."""

    start: int
    steps: tuple[Step, ...]

    def values(self) -> tuple[int, ...]:
        """The running count: start, then the value after each step."""
        values = [self.start]
        for step in self.steps:
            values.append(step.apply(values[-1]))
        return tuple(values)

    @property
    def answer(self) -> int:
        return self.values()[-1]


@dataclass(frozen=True)
class Difficulty:
    """How hard the problems are: steps per problem, number ranges, operations.

    Every intermediate count stays within 0..max_value; operands of add/sub are 1..max_operand;
    "mul" (off by default) multiplies by 2..max_factor.
    """

    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 20
    max_operand: int = 9
    max_factor: int = 3
    max_value: int = 99
    ops: tuple[Op, ...] = ("add", "sub")

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not 1 <= self.max_start <= self.max_value:
            raise ValueError(f"need 1 <= max_start <= max_value, got {self.max_start}, {self.max_value}")
        if self.max_operand < 1 or self.max_factor < 2:
            raise ValueError(
                f"need max_operand >= 1 and max_factor >= 2, got {self.max_operand}, {self.max_factor}"
            )
        if not self.ops or len(set(self.ops)) != len(self.ops) or not set(self.ops) <= set(OPS):
            raise ValueError(f"ops must be distinct names from {OPS}, got {self.ops}")


def _operands(op: Op, value: int, difficulty: Difficulty) -> range:
    """The operands of `op` that keep the count within 0..max_value."""
    if op == "add":
        return range(1, min(difficulty.max_operand, difficulty.max_value - value) + 1)
    if op == "sub":
        return range(1, min(difficulty.max_operand, value) + 1)
    largest = difficulty.max_value // value if value else 1  # multiplying 0 teaches nothing
    return range(2, min(difficulty.max_factor, largest) + 1)


def _sample_step(rng: random.Random, value: int, difficulty: Difficulty) -> Step | None:
    """A random step valid from `value` (operation first, then operand), or None if none is valid."""
    options = {op: _operands(op, value, difficulty) for op in difficulty.ops}
    valid_ops = [op for op in difficulty.ops if options[op]]
    if not valid_ops:
        return None
    op = rng.choice(valid_ops)
    return Step(op, rng.choice(options[op]))


def _try_problem(rng: random.Random, difficulty: Difficulty) -> Problem | None:
    """A random problem, or None when the count gets stuck before the drawn number of steps."""
    start = rng.randint(1, difficulty.max_start)
    steps: list[Step] = []
    value = start
    for _ in range(rng.randint(difficulty.min_steps, difficulty.max_steps)):
        step = _sample_step(rng, value, difficulty)
        if step is None:
            return None
        steps.append(step)
        value = step.apply(value)
    return Problem(start=start, steps=tuple(steps))


def sample_problem(rng: random.Random, difficulty: Difficulty, max_tries: int = 100) -> Problem:
    """A random problem; retried when the count gets stuck (e.g. ops=("sub",) reaching 0)."""
    for _attempt in range(max_tries):
        problem = _try_problem(rng, difficulty)
        if problem is not None:
            return problem
    raise ValueError(f"no problem satisfies {difficulty} after {max_tries} tries")


# ----------------------------------------------------------------------------- surface text


@dataclass(frozen=True)
class Person:
    name: str
    subject: str  # "he" / "she"
    object: str  # "him" / "her"


@dataclass(frozen=True)
class Item:
    singular: str
    plural: str

    def count(self, n: int) -> str:
        return f"{n} {self.singular if n == 1 else self.plural}"


PEOPLE: tuple[Person, ...] = (
    Person("Tom", "he", "him"),
    Person("Sam", "he", "him"),
    Person("Ben", "he", "him"),
    Person("Ann", "she", "her"),
    Person("Mia", "she", "her"),
    Person("Lily", "she", "her"),
)
ITEMS: tuple[Item, ...] = tuple(
    Item(word, f"{word}s") for word in ("apple", "pen", "book", "card", "coin", "egg")
)


@dataclass(frozen=True)
class Phrase:
    """A sentence template in the third person and in the first person (Point-of-View Shift).

    Slots: {name} {Sub} {sub} {obj} (the hero), {friend}, {items} (plural noun), {count}, {n}.
    """

    third: str
    first: str

    def render(self, voice: Voice, slots: Mapping[str, object]) -> str:
        return (self.third if voice == "third" else self.first).format(**slots)


OPENING = Phrase("{name} has {count}.", "I have {count}.")
TRAP = Phrase("{friend} has {count} too.", "{friend} has {count} too.")  # the distractor (trapped family)
QUESTION = Phrase("How many {items} does {name} have now?", "How many {items} do I have now?")
STEP_PHRASES: Mapping[Op, tuple[Phrase, ...]] = {
    "add": (
        Phrase("{Sub} buys {n} more.", "I buy {n} more."),
        Phrase("{Sub} finds {n} more.", "I find {n} more."),
        Phrase("{friend} gives {obj} {n} more.", "{friend} gives me {n} more."),
    ),
    "sub": (
        Phrase("{Sub} gives {n} away.", "I give {n} away."),
        Phrase("{Sub} loses {n}.", "I lose {n}."),
        Phrase("{Sub} gives {n} to {friend}.", "I give {n} to {friend}."),
    ),
    "mul": (
        Phrase("Now {sub} has {n} times as many.", "Now I have {n} times as many."),
        Phrase("{Sub} ends up with {n} times as many.", "I end up with {n} times as many."),
    ),
}


@dataclass(frozen=True)
class Scene:
    """The surface of a problem: who, with what, and which phrasing each step uses."""

    hero: Person
    friend: Person
    item: Item
    phrasing: tuple[int, ...]

    def slots(self) -> dict[str, object]:
        return {
            "name": self.hero.name,
            "Sub": self.hero.subject.capitalize(),
            "sub": self.hero.subject,
            "obj": self.hero.object,
            "friend": self.friend.name,
            "items": self.item.plural,
        }


def sample_scene(rng: random.Random, problem: Problem, avoid: Scene | None = None) -> Scene:
    """A random scene for `problem`; with `avoid`, hero and item differ from it and phrasing is kept."""
    heroes = [p for p in PEOPLE if avoid is None or p != avoid.hero]
    items = [i for i in ITEMS if avoid is None or i != avoid.item]
    hero = rng.choice(heroes)
    friend = rng.choice([p for p in PEOPLE if p != hero])
    if avoid is not None:
        phrasing = avoid.phrasing
    else:
        phrasing = tuple(rng.randrange(len(STEP_PHRASES[step.op])) for step in problem.steps)
    return Scene(hero=hero, friend=friend, item=rng.choice(items), phrasing=phrasing)


def render_problem(
    problem: Problem,
    scene: Scene,
    *,
    voice: Voice = "third",
    noise: str | None = None,
    trap: int | None = None,
) -> str:
    """The word problem; `trap` (trapped family) is the distractor count, told right after the opening;
    `noise` is an irrelevant sentence placed after the opening (and the distractor)."""
    slots = scene.slots()
    sentences = [OPENING.render(voice, {**slots, "count": scene.item.count(problem.start)})]
    if trap is not None:
        sentences.append(TRAP.render(voice, {**slots, "count": scene.item.count(trap)}))
    if noise is not None:
        sentences.append(noise)
    for step, choice in zip(problem.steps, scene.phrasing, strict=True):
        sentences.append(STEP_PHRASES[step.op][choice].render(voice, {**slots, "n": step.operand}))
    sentences.append(QUESTION.render(voice, slots))
    return " ".join(sentences)


def solution_text(problem: Problem, values: Sequence[int] | None = None) -> str:
    """One equation per step, then the boxed answer: "7 + 5 = 12. 12 - 3 = 9. \\boxed{9}".

    `values` (start, then the result written after each step) replaces the true running count, for worked
    solutions that slip (`slip_values`); the boxed answer is the last of them.
    """
    values = problem.values() if values is None else tuple(values)
    equations = [
        f"{before} {SYMBOLS[step.op]} {step.operand} = {after}."
        for before, step, after in zip(values[:-1], problem.steps, values[1:], strict=True)
    ]
    return " ".join([*equations, f"\\boxed{{{values[-1]}}}"])


# ----------------------------------------------------------------------------- reframing strategies

# A strategy rewrites the problem's surface; it must keep every number of the computation and the answer.
# `trap` is the distractor of a trapped question: every strategy but Focus on Constraints retells it.
Strategy = Callable[..., str]  # (problem, scene, rng, *, trap: int | None = None) -> rewritten problem


def _domain_shift(problem: Problem, scene: Scene, rng: random.Random, *, trap: int | None = None) -> str:
    """Rename the person and the objects."""
    return render_problem(problem, sample_scene(rng, problem, avoid=scene), trap=trap)


def _point_of_view_shift(
    problem: Problem, scene: Scene, rng: random.Random, *, trap: int | None = None
) -> str:
    """Tell the problem in the first person."""
    return render_problem(problem, scene, voice="first", trap=trap)


def _add_noise(problem: Problem, scene: Scene, rng: random.Random, *, trap: int | None = None) -> str:
    """Add an irrelevant sentence with a number about other objects, which the solution ignores."""
    other = rng.choice([item for item in ITEMS if item != scene.item])
    noise = f"{scene.friend.name} has {other.count(rng.randint(2, 20))}."
    return render_problem(problem, scene, noise=noise, trap=trap)


def _focus_on_constraints(
    problem: Problem, scene: Scene, rng: random.Random, *, trap: int | None = None
) -> str:
    """Strip the story down to the start value and the ordered changes (which drops a distractor)."""
    del trap  # the restatement keeps only what changes the count
    changes = ", ".join(f"{SYMBOLS[step.op]}{step.operand}" for step in problem.steps)
    name, items = scene.hero.name, scene.item.plural
    return (
        f"{name} starts with {scene.item.count(problem.start)}. In order: {changes}. "
        f"How many {items} does {name} have at the end?"
    )


FOCUS = "Focus on Constraints"
STRATEGIES: Mapping[str, Strategy] = {
    "Domain Shift": _domain_shift,
    "Point-of-View Shift": _point_of_view_shift,
    "Add Noise": _add_noise,
    FOCUS: _focus_on_constraints,
}


def reframe_text(strategy: str, rewritten: str, solution: str) -> str:
    """The reframe-view response: one "<SECTION>: <body>" line per REFRAME_SECTIONS header, in order."""
    bodies = (strategy, rewritten, solution)
    return "\n".join(f"{header}: {body}" for header, body in zip(REFRAME_SECTIONS, bodies, strict=True))


# ----------------------------------------------------------------------------- the wording trap

RIGHT, SPURIOUS, SLIP = "right", "spurious", "slip"
OUTCOMES: tuple[str, ...] = (RIGHT, SPURIOUS, SLIP)
SLIP_OFFSETS: tuple[int, ...] = (-3, -2, -1, 1, 2, 3)


@dataclass(frozen=True)
class TrapMix:
    """Shares of the outcomes of the trapped family's worked solutions in the warm-start corpus, per view.

    solver_spurious: a, solver-view solutions that start from the distractor (the rest are right);
    reframe_right: d, reframe-view responses that restate with Focus on Constraints (dropping the
        distractor) and solve right; reframe_spurious: b, responses with another strategy that keep the
        distractor sentence and start from it; the rest, e = 1 - d - b, slip (scattered wrong answers).
    Defaults: a = 0.8, d = 0.5, b = 0.1, e = 0.4 (the planted ordering is in the module docstring).
    """

    solver_spurious: float = 0.8
    reframe_right: float = 0.5
    reframe_spurious: float = 0.1

    def __post_init__(self) -> None:
        shares = (self.solver_spurious, self.reframe_right, self.reframe_spurious)
        if not all(0.0 <= x <= 1.0 for x in shares) or self.reframe_right + self.reframe_spurious > 1.0:
            raise ValueError(
                f"trap shares must be in [0, 1] with reframe_right + reframe_spurious <= 1, got {self}"
            )

    def shares(self) -> dict[str, dict[str, float]]:
        """{view: {outcome: share}} of the planted corpus."""
        return {
            SOLVER: {RIGHT: 1.0 - self.solver_spurious, SPURIOUS: self.solver_spurious, SLIP: 0.0},
            REFRAME: {
                RIGHT: self.reframe_right,
                SPURIOUS: self.reframe_spurious,
                SLIP: 1.0 - self.reframe_right - self.reframe_spurious,
            },
        }


# The selectors the demo compares: the harmonic mean (Self-Harmony), majority over the solver view (TTRL) and
# the arithmetic mean (majority over both views pooled, lambda = 0).
COMPARED_SELECTORS: tuple[str, ...] = ("harmonic", "majority", "arithmetic")


def planted_labels(shares: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """The outcome (RIGHT or SPURIOUS) each compared selector picks when a view's answer frequencies equal
    `shares` ({view: {outcome: share}}, e.g. `TrapMix.shares()` or the shares measured on a corpus).

    The selectors are harmony_mcore.labels' own (score_answers), on the proportions p_view(right) and
    p_view(spurious); slips are scattered over several answers and never compete. Ties go to RIGHT (the
    canonical order of the labeller is not known here).
    """
    p = np.array([[shares[SOLVER][RIGHT], shares[REFRAME][RIGHT]],
                  [shares[SOLVER][SPURIOUS], shares[REFRAME][SPURIOUS]]])
    winners = {}
    for strategy in COMPARED_SELECTORS:
        scores = score_answers(p, np.ones(2), strategy, LabelConfig(strategy=strategy))[0]
        winners[strategy] = RIGHT if scores[0] >= scores[1] else SPURIOUS
    return winners


def quota(n: int, shares: Sequence[float]) -> tuple[int, ...]:
    """Largest-remainder apportionment: counts summing to n, each floor(n s_i) or one more (ties: lower i)."""
    total = sum(shares)
    exact = [n * s / total for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


def planted_outcomes(rng: random.Random, n: int, shares: Mapping[str, float]) -> list[str]:
    """n outcomes in exact quotas of `shares` (`quota`), shuffled."""
    outcomes = [o for o, count in zip(OUTCOMES, quota(n, [shares[o] for o in OUTCOMES]), strict=True)
                for _ in range(count)]
    rng.shuffle(outcomes)
    return outcomes


@dataclass(frozen=True)
class TrappedProblem:
    """A problem told with a distractor: somebody else has `distractor` of the same objects."""

    problem: Problem
    distractor: int

    @property
    def answer(self) -> int:
        return self.problem.answer

    @property
    def spurious_problem(self) -> Problem:
        """What the trap makes of it: the same steps run from the distractor instead of the start."""
        return Problem(self.distractor, self.problem.steps)

    @property
    def spurious_answer(self) -> int:
        """answer - start + distractor (add/sub steps); never the answer, as distractor != start."""
        return self.spurious_problem.answer


def distractor_options(problem: Problem, difficulty: Difficulty) -> list[int]:
    """Distractor counts for `problem`: 1..max_start, not its start, and such that the story run from them
    keeps every count within 0..max_value (the spurious solution is as well-formed as the right one)."""
    options = []
    for count in range(1, difficulty.max_start + 1):
        values = Problem(count, problem.steps).values()
        if count != problem.start and min(values) >= 0 and max(values) <= difficulty.max_value:
            options.append(count)
    return options


def slip_values(problem: Problem, avoid: Sequence[int], rng: random.Random) -> tuple[int, ...]:
    """The running count with one slip: one step's result off by an offset in SLIP_OFFSETS, later steps
    computed right from the slipped value. Every value stays >= 0 and the final one avoids `avoid`."""
    true = problem.values()
    options = []
    for index in range(len(problem.steps)):
        for offset in SLIP_OFFSETS:
            values = list(true[: index + 1]) + [true[index + 1] + offset]
            for step in problem.steps[index + 1:]:
                values.append(step.apply(values[-1]))
            if min(values) >= 0 and values[-1] not in avoid:
                options.append(tuple(values))
    return rng.choice(options)  # never empty: offsets 1..3 keep every value >= 0, at most 2 are avoided


def _trapped_solution(trapped: TrappedProblem, outcome: str, rng: random.Random) -> str:
    if outcome == SPURIOUS:
        return solution_text(trapped.spurious_problem)
    if outcome == SLIP:
        avoid = (trapped.answer, trapped.spurious_answer)
        return solution_text(trapped.problem, slip_values(trapped.problem, avoid, rng))
    return solution_text(trapped.problem)


# ----------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class SyntheticExample:
    """A warm-start example: the question and its SFT target for each view."""

    question: Question
    solver_response: str
    reframe_response: str
    strategy: str


@dataclass(frozen=True)
class SyntheticTask:
    """warm: SFT examples; test: unlabeled test-time questions (ground_truth for metrics only), the ordinary
    ones first, then the trapped ones (source TRAP_SOURCE); difficulty: the settings they were generated with;
    spurious: the spurious answer of every trapped test question, by question id (metrics only)."""

    warm: tuple[SyntheticExample, ...]
    test: tuple[Question, ...]
    difficulty: Difficulty
    spurious: Mapping[str, str] = field(default_factory=dict)


def _distinct_problems(
    rng: random.Random, n: int, difficulty: Difficulty, exclude: frozenset[Problem]
) -> list[Problem]:
    """`n` distinct problems not in `exclude`; ValueError if the difficulty allows too few."""
    return _distinct(rng, n, difficulty, exclude, lambda problem: problem, "distinct problems")


def _question(split: str, index: int, problem: Problem, scene: Scene, trap: int | None = None) -> Question:
    source = SOURCE if trap is None else TRAP_SOURCE
    return Question(
        qid=f"{source}:{split}-{index:05d}",
        text=render_problem(problem, scene, trap=trap),
        answer_type="math",
        ground_truth=str(problem.answer),
        source=source,
    )


def _warm_example(
    index: int, problem: Problem, rng: random.Random, strategies: Sequence[str]
) -> SyntheticExample:
    scene = sample_scene(rng, problem)
    strategy = rng.choice(strategies)
    solution = solution_text(problem)
    rewritten = STRATEGIES[strategy](problem, scene, rng)
    return SyntheticExample(
        question=_question("warm", index, problem, scene),
        solver_response=solution,
        reframe_response=reframe_text(strategy, rewritten, solution),
        strategy=strategy,
    )


def _trapped_warm_example(
    index: int,
    trapped: TrappedProblem,
    rng: random.Random,
    strategies: Sequence[str],
    solver_outcome: str,
    reframe_outcome: str,
) -> SyntheticExample:
    """A trapped question with planted outcomes: the solver view's, and the reframe view's (RIGHT: Focus on
    Constraints, which drops the distractor; SPURIOUS: another strategy, which retells it; SLIP: any
    strategy)."""
    problem, trap = trapped.problem, trapped.distractor
    scene = sample_scene(rng, problem)
    if reframe_outcome == RIGHT:
        strategy = FOCUS
    elif reframe_outcome == SPURIOUS:
        strategy = rng.choice([name for name in strategies if name != FOCUS])
    else:
        strategy = rng.choice(strategies)
    rewritten = STRATEGIES[strategy](problem, scene, rng, trap=trap)
    return SyntheticExample(
        question=_question("warm", index, problem, scene, trap=trap),
        solver_response=_trapped_solution(trapped, solver_outcome, rng),
        reframe_response=reframe_text(strategy, rewritten, _trapped_solution(trapped, reframe_outcome, rng)),
        strategy=strategy,
    )


def _distinct_trapped(
    rng: random.Random, n: int, difficulty: Difficulty, exclude: frozenset[Problem]
) -> list[TrappedProblem]:
    """`n` trapped problems with distinct arithmetic not in `exclude` (problems without a distractor option
    are skipped); ValueError if the difficulty allows too few."""

    def trap(problem: Problem) -> TrappedProblem | None:
        options = distractor_options(problem, difficulty)
        return TrappedProblem(problem, rng.choice(options)) if options else None

    return _distinct(rng, n, difficulty, exclude, trap, "distinct trapped problems")


def _distinct(rng: random.Random, n: int, difficulty: Difficulty, exclude: frozenset[Problem], make, what: str
              ) -> list:
    """`n` items make(problem) (None: skip it) of problems sampled until `n` distinct ones outside `exclude` gave
    one; ValueError naming `what` if the difficulty allows too few."""
    seen = set(exclude)
    items: list = []
    max_tries = 100 * n + 1000
    for _ in range(max_tries):
        if len(items) == n:
            break
        problem = sample_problem(rng, difficulty)
        if problem in seen:
            continue
        seen.add(problem)
        item = make(problem)
        if item is not None:
            items.append(item)
    if len(items) < n:
        raise ValueError(f"found only {len(items)} of {n} {what} in {max_tries} tries; widen {difficulty}")
    return items


def make_task(
    seed: int,
    n_warm: int,
    n_test: int,
    *,
    difficulty: Difficulty | None = None,
    strategies: Sequence[str] = tuple(STRATEGIES),
    n_trap_warm: int = 0,
    n_trap_test: int = 0,
    trap_mix: TrapMix = TrapMix(),
) -> SyntheticTask:
    """The warm-start SFT set and a disjoint test-time set, deterministic from `seed`.

    Disjoint means no test problem's arithmetic (start value and steps) appears in the warm-start set;
    problems are also distinct within each set. `strategies` restricts the reframing strategies used.
    n_trap_warm / n_trap_test add trapped questions (module docstring) with the planted `trap_mix`; their
    arithmetic is distinct from every test problem's and never occurs in the trapped warm-start examples,
    but may occur in the ordinary warm-start set (told without the distractor): the two-step demo task has
    few distinct problems. The ordinary sets do not depend on the trapped ones.
    """
    difficulty = difficulty or Difficulty()
    if min(n_warm, n_test, n_trap_warm, n_trap_test) < 0:
        raise ValueError(
            f"n_warm, n_test, n_trap_warm and n_trap_test must be >= 0, got {n_warm}, {n_test}, "
            f"{n_trap_warm}, {n_trap_test}"
        )
    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(
            f"strategies must be a non-empty subset of {list(STRATEGIES)}, got {list(strategies)}"
        )
    if n_trap_warm and (FOCUS not in strategies or len(strategies) < 2):
        raise ValueError(
            f"trapped warm-start examples need {FOCUS!r} and another strategy, got {list(strategies)}"
        )
    test_rng = random.Random(f"harmony-synthetic/{seed}/test")
    test_problems = _distinct_problems(test_rng, n_test, difficulty, frozenset())
    test = tuple(
        _question("test", i, problem, sample_scene(test_rng, problem))
        for i, problem in enumerate(test_problems)
    )
    warm_rng = random.Random(f"harmony-synthetic/{seed}/warm")
    warm_problems = _distinct_problems(warm_rng, n_warm, difficulty, frozenset(test_problems))
    warm = tuple(_warm_example(i, problem, warm_rng, strategies) for i, problem in enumerate(warm_problems))
    if not n_trap_warm and not n_trap_test:
        return SyntheticTask(warm=warm, test=test, difficulty=difficulty)

    trap_test_rng = random.Random(f"harmony-synthetic/{seed}/trap-test")
    trap_test = _distinct_trapped(trap_test_rng, n_trap_test, difficulty, frozenset(test_problems))
    trap_questions = tuple(
        _question("test", i, t.problem, sample_scene(trap_test_rng, t.problem), trap=t.distractor)
        for i, t in enumerate(trap_test)
    )
    trap_warm_rng = random.Random(f"harmony-synthetic/{seed}/trap-warm")
    used = frozenset(test_problems) | {t.problem for t in trap_test}
    trap_warm = _distinct_trapped(trap_warm_rng, n_trap_warm, difficulty, used)
    shares = trap_mix.shares()
    solver_outcomes = planted_outcomes(trap_warm_rng, n_trap_warm, shares[SOLVER])
    reframe_outcomes = planted_outcomes(trap_warm_rng, n_trap_warm, shares[REFRAME])
    trap_examples = tuple(
        _trapped_warm_example(i, t, trap_warm_rng, strategies, solver, reframe)
        for i, (t, solver, reframe) in enumerate(
            zip(trap_warm, solver_outcomes, reframe_outcomes, strict=True)
        )
    )
    spurious = {q.qid: str(t.spurious_answer) for q, t in zip(trap_questions, trap_test, strict=True)}
    return SyntheticTask(warm=warm + trap_examples, test=test + trap_questions, difficulty=difficulty,
                         spurious=spurious)


# ----------------------------------------------------------------------------- files

# SyntheticExample fields stored next to the project fields in warm.jsonl.
_RESPONSE_KEYS = ("solver_response", "reframe_response", "strategy")


def write_task(task: SyntheticTask, directory: Path | str) -> tuple[Path, Path]:
    """Write `warm.jsonl` (project format + solver_response, reframe_response, strategy) and
    `test.jsonl` (project format; with trapped questions, plus `spurious_answer`: null for ordinary ones,
    ignored by `load_questions`) under `directory`; returns their paths (warm, test)."""
    directory = Path(directory)
    warm_path, test_path = directory / WARM_FILE, directory / TEST_FILE
    extra = [{key: getattr(example, key) for key in _RESPONSE_KEYS} for example in task.warm]
    write_questions([example.question for example in task.warm], warm_path, extra=extra)
    test_extra = [{"spurious_answer": task.spurious.get(q.qid)} for q in task.test] if task.spurious else None
    write_questions(task.test, test_path, extra=test_extra)
    return warm_path, test_path


def _example_from_row(fields: Row, row: RawRow) -> SyntheticExample:
    question = question_from_record(fields, RowContext(index=row.index, source=SOURCE))
    responses = {key: require_text(fields, key) for key in _RESPONSE_KEYS}
    return SyntheticExample(question=question, **responses)


def read_warm_start(path: Path | str) -> list[SyntheticExample]:
    """The warm-start examples written by `write_task`; DataError naming file, line and field if bad."""
    table = read_table(path)
    items = convert_rows(table, _example_from_row, skip_bad_rows=False).items
    check_unique(table.path, [(row, example.question) for row, example in items])
    return [example for _, example in items]
