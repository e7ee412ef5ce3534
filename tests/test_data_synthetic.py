"""The procedural arithmetic task: determinism, disjoint splits, correct answers, well-formed reframes, and
the trapped family's planted bias measured on the generated corpus.

Answers are recomputed from the *text* by a parser written independently of the generator's templates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harmony_mcore.data import load_questions
from harmony_mcore.data.synthetic import (
    STRATEGIES,
    TRAP_SOURCE,
    Difficulty,
    TrapMix,
    make_task,
    planted_labels,
    quota,
    read_warm_start,
    write_task,
)
from harmony_mcore.records import REFRAME, REFRAME_SECTIONS, SOLVER

Skeleton = tuple[int, tuple[tuple[str, int], ...]]

_SYMBOL_OPS = {"+": "add", "-": "sub", "*": "mul"}


def _sentence_step(sentence: str) -> tuple[str, int] | None:
    """The operation a story sentence describes, or None for a sentence that changes nothing."""
    if match := re.search(r"(\d+) times as many", sentence):
        return ("mul", int(match[1]))
    if match := re.search(r"(\d+) more", sentence):
        return ("add", int(match[1]))
    if match := re.search(r"\b(?:gives?|loses?|lose) (\d+)\b", sentence):
        return ("sub", int(match[1]))
    return None


_TRAP = re.compile(r"\w+ has (\d+) \w+ too\.")


def parse_trap(text: str) -> int | None:
    """The distractor count of a trapped question ("Ann has 4 apples too."), None without one."""
    match = _TRAP.search(text)
    return int(match[1]) if match else None


def parse_problem(text: str) -> Skeleton:
    """(start, steps) of a problem text, story form or "In order: +5, -3" form; noise, distractor ignored."""
    start = int(re.search(r"(?:has|have|starts with) (\d+) ", text)[1])
    if match := re.search(r"In order: ([^.]*)\.", text):
        steps = tuple((_SYMBOL_OPS[c[0]], int(c[1:])) for c in match[1].split(", "))
        return start, steps
    sentences = re.split(r"(?<=[.?]) ", text)
    assert sentences[-1].startswith("How many")
    noise = re.compile(r"\w+ has \d+ \w+\.")
    story = [s for s in sentences[1:-1] if not noise.fullmatch(s) and not _TRAP.fullmatch(s)]
    steps = tuple(_sentence_step(s) for s in story)
    assert None not in steps, text
    return start, steps  # type: ignore[return-value]


def evaluate(skeleton: Skeleton) -> int:
    value, steps = skeleton
    for op, n in steps:
        value = {"add": value + n, "sub": value - n, "mul": value * n}[op]
        assert 0 <= value <= 99
    return value


def boxed(solution: str) -> int:
    match = re.fullmatch(r".*\\boxed\{(\d+)\}", solution)
    assert match is not None, solution
    return int(match[1])


def equations(solution: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), _SYMBOL_OPS[op], int(b), int(c))
            for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", solution)]


def check_solution(solution: str, skeleton: Skeleton) -> int:
    """Each equation is right, chained, and follows the skeleton; returns the boxed answer."""
    equations = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", solution)
    value = skeleton[0]
    for (a, symbol, b, c), (op, n) in zip(equations, skeleton[1], strict=True):
        assert (int(a), _SYMBOL_OPS[symbol], int(b)) == (value, op, n)
        value = evaluate((value, ((op, n),)))
        assert int(c) == value
    boxed = re.fullmatch(r".*\\boxed\{(\d+)\}", solution)
    assert boxed is not None, solution
    return int(boxed[1])


def reframe_sections(response: str) -> dict[str, str]:
    lines = response.split("\n")
    assert [line.split(": ", 1)[0] for line in lines] == list(REFRAME_SECTIONS)
    return dict(line.split(": ", 1) for line in lines)


def approx_tokens(text: str) -> int:
    """Word pieces with one token per digit (Qwen tokenizers split numbers into digits)."""
    return len(re.findall(r"[A-Za-z]+|\d|[^\w\s]", text))


@pytest.fixture(scope="module")
def task():
    return make_task(seed=7, n_warm=400, n_test=100)


def test_deterministic(task) -> None:
    assert make_task(seed=7, n_warm=400, n_test=100) == task
    assert make_task(seed=8, n_warm=400, n_test=100).test != task.test


def test_test_set_does_not_depend_on_warm_size(task) -> None:
    assert make_task(seed=7, n_warm=3, n_test=100).test == task.test


def test_sizes_ids_and_labels(task) -> None:
    assert (len(task.warm), len(task.test)) == (400, 100)
    ids = [e.question.qid for e in task.warm] + [q.qid for q in task.test]
    assert len(set(ids)) == len(ids)
    assert all(q.source == "synthetic" and q.answer_type == "math" for q in task.test)


def test_splits_are_disjoint_and_distinct(task) -> None:
    warm = [parse_problem(e.question.text) for e in task.warm]
    test = [parse_problem(q.text) for q in task.test]
    assert len(set(warm)) == len(warm) and len(set(test)) == len(test)
    assert not set(warm) & set(test)


def test_answers_are_correct(task) -> None:
    difficulty = Difficulty()
    for question in [e.question for e in task.warm] + list(task.test):
        skeleton = parse_problem(question.text)
        assert difficulty.min_steps <= len(skeleton[1]) <= difficulty.max_steps
        assert question.ground_truth == str(evaluate(skeleton))
    for example in task.warm:
        assert check_solution(example.solver_response, parse_problem(example.question.text)) == int(
            example.question.ground_truth
        )


def test_reframes_keep_numbers_and_answer(task) -> None:
    used = set()
    for example in task.warm:
        sections = reframe_sections(example.reframe_response)
        strategy, rewritten, solution = (sections[name] for name in REFRAME_SECTIONS)
        assert strategy == example.strategy in STRATEGIES
        used.add(strategy)
        assert rewritten != example.question.text
        original = parse_problem(example.question.text)
        assert parse_problem(rewritten) == original, rewritten
        assert solution == example.solver_response
        assert check_solution(solution, original) == int(example.question.ground_truth)
    assert used == set(STRATEGIES)


def test_texts_are_short_with_a_small_vocabulary(task) -> None:
    words: set[str] = set()
    for example in task.warm:
        prompt = example.question.text
        assert approx_tokens(prompt) + approx_tokens(example.solver_response) < 120
        assert approx_tokens(prompt) + approx_tokens(example.reframe_response) < 200
        words |= set(re.findall(r"[A-Za-z]+", prompt + example.reframe_response))
    assert len(words) < 100


def test_difficulty_controls_steps_ops_and_range() -> None:
    difficulty = Difficulty(min_steps=3, max_steps=3, max_start=9, ops=("add", "sub", "mul"))
    hard = make_task(seed=1, n_warm=200, n_test=0, difficulty=difficulty)
    skeletons = [parse_problem(e.question.text) for e in hard.warm]
    assert {len(steps) for _, steps in skeletons} == {3}
    assert {op for _, steps in skeletons for op, _ in steps} == {"add", "sub", "mul"}
    assert all(1 <= start <= 9 for start, _ in skeletons)
    for example, skeleton in zip(hard.warm, skeletons, strict=True):
        assert example.question.ground_truth == str(evaluate(skeleton))


def test_strategy_subset() -> None:
    small = make_task(seed=0, n_warm=20, n_test=0, strategies=["Add Noise"])
    assert {e.strategy for e in small.warm} == {"Add Noise"}
    with pytest.raises(ValueError, match="strategies must be a non-empty subset"):
        make_task(seed=0, n_warm=1, n_test=0, strategies=["Reverse"])


@pytest.mark.parametrize(
    "kwargs",
    [{"min_steps": 3, "max_steps": 2}, {"max_start": 0}, {"max_factor": 1}, {"ops": ("div",)}, {"ops": ()}],
)
def test_invalid_difficulty(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Difficulty(**kwargs)


def test_too_few_distinct_problems() -> None:
    tiny = Difficulty(min_steps=1, max_steps=1, max_start=1, max_operand=1, ops=("add",))
    assert len(make_task(seed=0, n_warm=0, n_test=1, difficulty=tiny).test) == 1
    with pytest.raises(ValueError, match="found only 1 of 2 distinct problems"):
        make_task(seed=0, n_warm=0, n_test=2, difficulty=tiny)


def test_write_and_read_back(tmp_path: Path) -> None:
    task = make_task(seed=3, n_warm=30, n_test=10)
    warm_path, test_path = write_task(task, tmp_path / "synthetic")
    assert read_warm_start(warm_path) == list(task.warm)
    assert load_questions(test_path) == list(task.test)
    assert load_questions(warm_path) == [e.question for e in task.warm]


# ----------------------------------------------------------------------------- the trapped family

DEMO_DIFFICULTY = Difficulty(min_steps=2, max_steps=2, max_start=9, max_operand=9, max_value=18)


@pytest.fixture(scope="module")
def trapped():
    return make_task(
        seed=7, n_warm=100, n_test=20, difficulty=DEMO_DIFFICULTY, n_trap_warm=400, n_trap_test=40
    )


def classify(solution: str, skeleton: Skeleton, distractor: int) -> str:
    """right / spurious / other, from the text alone: the boxed answer against the story run from the start
    and from the distractor; the equations must show how (every step right, or exactly one slip)."""
    answer, right = boxed(solution), evaluate(skeleton)
    start, steps = skeleton
    if answer == right:
        assert check_solution(solution, skeleton) == right
        return "right"
    if answer == evaluate((distractor, steps)):
        assert check_solution(solution, (distractor, steps)) == answer
        return "spurious"
    written = equations(solution)
    assert [(a, op, b) for a, op, b, _ in written][0] == (start, *steps[0])  # starts from the start
    wrong = [(a, op, b, c) for a, op, b, c in written if evaluate((a, ((op, b),))) != c]
    (a, op, b, written_result), = wrong  # exactly one slip, off by 1..3
    assert 1 <= abs(written_result - evaluate((a, ((op, b),)))) <= 3, solution
    return "other"


def measured_shares(examples) -> dict[str, dict[str, float]]:
    """{view: {outcome: share}} of the trapped warm-start examples, parsed from their texts."""
    tallies = {view: {"right": 0, "spurious": 0, "other": 0} for view in (SOLVER, REFRAME)}
    for example in examples:
        skeleton, distractor = parse_problem(example.question.text), parse_trap(example.question.text)
        tallies[SOLVER][classify(example.solver_response, skeleton, distractor)] += 1
        solution = reframe_sections(example.reframe_response)["SOLUTION"]
        tallies[REFRAME][classify(solution, skeleton, distractor)] += 1
    return {view: {("slip" if k == "other" else k): v / len(examples) for k, v in t.items()}
            for view, t in tallies.items()}


def test_trapped_questions_and_their_answers(trapped) -> None:
    ordinary = [q for q in trapped.test if q.source == "synthetic"]
    traps = [q for q in trapped.test if q.source == TRAP_SOURCE]
    assert (len(ordinary), len(traps)) == (20, 40) and trapped.test[:20] == tuple(ordinary)
    assert set(trapped.spurious) == {q.qid for q in traps}
    for question in traps:
        assert question.qid.startswith(f"{TRAP_SOURCE}:test-")
        distractor = parse_trap(question.text)
        start, steps = parse_problem(question.text)
        assert distractor is not None and 1 <= distractor <= 9 and distractor != start
        spurious = evaluate((distractor, steps))  # the story run from the distractor, counts within 0..99
        assert question.ground_truth == str(evaluate((start, steps))) != str(spurious)
        assert trapped.spurious[question.qid] == str(spurious)
    assert all(parse_trap(q.text) is None for q in ordinary)
    # The two families' test questions are different problems, and no trapped warm-start example tells a
    # test question's arithmetic.
    test_skeletons = [parse_problem(q.text) for q in trapped.test]
    assert len(set(test_skeletons)) == len(test_skeletons)
    trap_warm = [e for e in trapped.warm if e.question.source == TRAP_SOURCE]
    assert len(trap_warm) == 400
    assert not {parse_problem(e.question.text) for e in trap_warm} & set(test_skeletons)


def test_ordinary_sets_do_not_depend_on_the_trapped_family(trapped) -> None:
    plain = make_task(seed=7, n_warm=100, n_test=20, difficulty=DEMO_DIFFICULTY)
    assert trapped.warm[:100] == plain.warm and trapped.test[:20] == plain.test and not plain.spurious
    more = make_task(
        seed=7, n_warm=100, n_test=20, difficulty=DEMO_DIFFICULTY, n_trap_warm=10, n_trap_test=40
    )
    assert more.test == trapped.test  # the test set does not depend on the warm-start sizes


def test_planted_bias_measured_on_the_corpus(trapped) -> None:
    """The corpus commits the trap as planted: the solver view starts from the distractor in 80% of the
    trapped examples; the reframe view is right in 50%, spurious in 10%, and slips in 40% (exact quotas of
    400)."""
    examples = [e for e in trapped.warm if e.question.source == TRAP_SOURCE]
    shares = measured_shares(examples)
    assert shares[SOLVER] == pytest.approx({"right": 0.2, "spurious": 0.8, "slip": 0.0})
    assert shares[REFRAME] == pytest.approx({"right": 0.5, "spurious": 0.1, "slip": 0.4})
    assert shares[SOLVER]["spurious"] > 0.5 and shares[REFRAME]["right"] > shares[REFRAME]["spurious"]
    # On these frequencies TTRL's label and the pooled vote are the spurious answer, Self-Harmony's the right
    # one.
    assert planted_labels(shares) == {"harmonic": "right", "majority": "spurious", "arithmetic": "spurious"}
    # The mechanism: the restatement that drops the distractor is the one that gets it right.
    for example in examples:
        sections = reframe_sections(example.reframe_response)
        skeleton, distractor = parse_problem(example.question.text), parse_trap(example.question.text)
        outcome = classify(sections["SOLUTION"], skeleton, distractor)
        kept = parse_trap(sections["REWRITTEN PROBLEM"])
        assert (kept is None) == (example.strategy == "Focus on Constraints")
        assert kept in (None, distractor) and parse_problem(sections["REWRITTEN PROBLEM"]) == skeleton
        if outcome == "right":
            assert example.strategy == "Focus on Constraints"
        if outcome == "spurious":
            assert kept == distractor
    # Slips are scattered: answers off by -3..3 (never right, never spurious: classify checks), no offset
    # holding more than 30% of them.
    slips = []
    for example in examples:
        solution = reframe_sections(example.reframe_response)["SOLUTION"]
        skeleton, distractor = parse_problem(example.question.text), parse_trap(example.question.text)
        if classify(solution, skeleton, distractor) == "other":
            slips.append(boxed(solution) - evaluate(skeleton))
    assert len(slips) == 160 and set(slips) == {-3, -2, -1, 1, 2, 3}
    assert max(slips.count(offset) for offset in set(slips)) < 0.3 * len(slips)


def test_trapped_texts_stay_short(trapped) -> None:
    for example in trapped.warm:
        assert approx_tokens(example.question.text) + approx_tokens(example.reframe_response) < 200
        assert approx_tokens(example.solver_response) < 40


def test_planted_labels_by_hand() -> None:
    """Default mix: p_solver = (right .2, spurious .8), p_reframe = (right .5, spurious .1).
    majority: .2 < .8; pooled: (.2 + .5)/2 = .35 < (.8 + .1)/2 = .45;
    harmonic: 2 .2 .5 / .7 = .286 > 2 .8 .1 / .9 = .178."""
    assert planted_labels(TrapMix().shares()) == {"harmonic": "right", "majority": "spurious",
                                                  "arithmetic": "spurious"}
    # Without scattered reframe errors the pooled vote is right too (the module docstring's e > 0 condition).
    assert planted_labels(TrapMix(0.8, 0.9, 0.1).shares())["arithmetic"] == "right"
    # A reframing that commits the trap as often as the solver: every selector is fooled.
    assert set(planted_labels(TrapMix(0.8, 0.2, 0.8).shares()).values()) == {"spurious"}


def test_quota() -> None:
    assert quota(400, [0.55, 0.05, 0.40]) == (220, 20, 160)
    assert quota(10, [0.8, 0.2, 0.0]) == (8, 2, 0)
    assert quota(7, [0.5, 0.5]) == (4, 3)
    assert quota(3, [1 / 3] * 3) == (1, 1, 1)
    assert quota(0, [0.5, 0.5]) == (0, 0)


@pytest.mark.parametrize("shares", [(1.1, 0.5, 0.0), (0.5, 0.6, 0.5), (0.5, -0.1, 0.0)])
def test_invalid_trap_mix(shares) -> None:
    with pytest.raises(ValueError, match="trap shares"):
        TrapMix(*shares)


def test_trapped_needs_focus_on_constraints() -> None:
    with pytest.raises(ValueError, match="Focus on Constraints"):
        make_task(seed=0, n_warm=0, n_test=0, n_trap_warm=5, strategies=["Add Noise", "Domain Shift"])


def test_write_and_read_back_with_trapped_questions(tmp_path: Path) -> None:
    task = make_task(seed=3, n_warm=10, n_test=5, n_trap_warm=10, n_trap_test=4)
    warm_path, test_path = write_task(task, tmp_path)
    assert read_warm_start(warm_path) == list(task.warm)
    assert load_questions(test_path) == list(task.test)
    rows = [json.loads(line) for line in test_path.read_text().splitlines()]
    written = {row["id"]: row["spurious_answer"] for row in rows}
    assert written == {q.qid: task.spurious.get(q.qid) for q in task.test}
