"""Final answers: extraction from a response, normalisation, and equivalence classes.

Pipeline for one sample: `extract_answer` (raw text -> raw answer, "" when there is none) ->
`normalize_answer` (cheap string rewrites, so that most equivalent answers become identical strings) -> per
question, `cluster_answers` over the distinct normalised strings (math-verify between remaining candidates).
Counting happens on the classes, never on raw strings (the published code counted exact strings).

Canonical order and representatives: distinct normalised answers are ordered by `canonical_key`
(shorter first, then lexicographic); each class is represented by its first member in that order, i.e. its
shortest, then lexicographically smallest, normalised string ("0.5" for {"0.5", "1/2", "\\frac{1}{2}"}), and
classes are numbered in the order of their representatives. Both depend only on the set of distinct strings,
so every data-parallel rank derives the same classes from the same set.

Time limits: math-verify limits a parse or comparison with SIGALRM, which only works in the main thread. In
any other thread (Ray threaded actors, thread pools) the call runs in a daemon helper thread instead and is
abandoned past the limit (it may keep a CPU busy until it finishes). A parse or comparison that times out
counts as "not equivalent"; the result is cached, and in a distributed step one rank decides each question's
classes and shares them, so a timeout can never make ranks disagree.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar, get_args

from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

from harmony_mcore.records import AnswerType

logger = logging.getLogger(__name__)
T = TypeVar("T")

ANSWER_TYPES: tuple[AnswerType, ...] = get_args(AnswerType)

_CACHE_SIZE = 1 << 16
# Longer answers are unparseable (""): bounds the time and memory of normalisation, caches and clustering.
# Real final answers (numbers, expressions, intervals, matrices) are far shorter.
MAX_ANSWER_CHARS = 4096


# ---------------------------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces kept), or the token of `\\boxed 5`.

    None when there is no box, or when the last box is cut off before its closing brace (a truncated answer is
    no answer: an earlier box is a draft, not the final answer).
    """
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    if boxed < 0 and fbox < 0:
        return None
    end = boxed + len("\\boxed") if boxed > fbox else fbox + len("\\fbox")
    rest = text[end:]
    body = rest.lstrip()
    if body.startswith("{"):
        return _braced(body)
    if body is rest:  # "\boxedx": another command, not a box
        return None
    token = re.match(r"[^\s$]+", body)
    return token.group(0) if token else None


_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def _braced(text: str) -> str | None:
    """Content of the brace group opening at text[0] == "{", honouring nesting and escaped braces."""
    close = text.find("}")
    if close > 0 and "{" not in text[1:close] and "\\" not in text[1:close]:  # fast path: flat content
        return text[1:close]
    depth = 0
    for token in _BRACE_TOKEN.finditer(text):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return text[1 : token.start()]
    return None


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_ANSWER_PHRASE = re.compile(
    r"(?i:answer)\s*(?:(?i:is)\s*:?|:)\s*(?:(?i:option|choice)\s*)?[*$]*\(?\s*([A-Z])\b"
)
_CHOICE_FORM = re.compile(r"\(?([A-Z])(?:\)|\.|:|\s|$)")


def choice_letter(answer: str, letters: str) -> str:
    """The option letter an answer string names, "" if none: `B`, `(B)`, `B.`, `B)`, `B: 12`, `\\text{(B)}`.

    The letter must start the (unwrapped) string: "Bob" is not an option.
    """
    core = _TEXT_WRAPPER.sub(r"\1", answer).strip().strip("$*").strip()
    match = _CHOICE_FORM.match(core)
    return match.group(1) if match and match.group(1) in letters else ""


def extract_choice(text: str, letters: str) -> str:
    """The option letter a multiple-choice response ends with, "" if none.

    First match wins: the last box naming a letter; the last "answer is B" / "Answer: (B)" phrase; the last
    non-empty line when it is only an option (`(B)`, `B.`, `Answer: B`). Option lists quoted in the reasoning
    are not mistaken for the answer because a bare "(C)" elsewhere in the text is not accepted.
    """
    boxed = last_boxed(text)
    if boxed is not None and (letter := choice_letter(boxed, letters)):
        return letter
    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        if match.group(1) in letters:
            return match.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    last = re.sub(r"^(?i:final\s+)?(?i:answer)\s*:?\s*", "", lines[-1].strip("*# "))
    return choice_letter(last, letters) if len(last) <= 4 else ""


def extract_answer(text: str, answer_type: AnswerType, letters: str = "ABCDEFGHIJ") -> str:
    """The raw final answer of a response: last box for maths, option letter for choices; "" if none."""
    if answer_type == "choice":
        return extract_choice(text, letters)
    return last_boxed(text) or ""


# ------------------------------------------------------------------------------------------- normalisation

_SPACING = re.compile(
    r"\\[!,;: ]|\\q?quad(?![A-Za-z])|~|\\displaystyle|\\left(?![A-Za-z])|\\right(?![A-Za-z])"
)
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree(?![A-Za-z])")
_UNIT_TEXT = re.compile(
    r"^(?P<value>.*?[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\{?\d\}?)?$"
)
_UNIT_WORD = re.compile(
    r"^(?P<value>-?\d[\d,]*(?:\.\d+)?)\s+"
    r"(?!(?:pi|sqrt|ln|log|exp|sin|cos|tan|cot|sec|csc)\b)[A-Za-z]{2}[A-Za-z .]*$"  # {2}, not {2,}: linear
)
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL = re.compile(r"^-?\d+\.\d*$")
_INTEGER = re.compile(r"^-?\d+$")
_LEADING_ZEROS = re.compile(r"^(-?)0+(?=\d)")
_COMMAND_SPACE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])")


def normalize_math(answer: str) -> str:
    """Cheap, meaning-preserving rewrites of a maths answer, applied before any equivalence test.

    In order: strip `$` and spacing commands (`\\!`, `\\,`, `\\;`, `\\quad`, `~`, `\\left`, `\\right`,
    `\\displaystyle`); `\\dfrac`/`\\tfrac` -> `\\frac`; drop degree marks, percent signs and `\\$` (the MATH
    grading convention: "50\\%" and "50" are the same answer); unwrap an answer entirely in `\\text{...}`;
    drop a trailing unit (`5\\text{ cm}^2`, `12 dollars`, but not `2 pi`); drop whitespace except between a
    command and a letter (`\\pi r`); unwrap outer braces; drop trailing full stops; `.5` -> `0.5`;
    `1{,}000` / `1,000` -> `1000`; `5.0` -> `5`, `0.50` -> `0.5`, `007` -> `7`.

    Any input is answered in time and memory linear in its length, and never raises: an answer longer than
    MAX_ANSWER_CHARS is unparseable, i.e. "" like a response without an answer (this also bounds the memory
    of the caches here and of every later step).
    """
    if len(answer) > MAX_ANSWER_CHARS:
        return ""
    return _normalize_math(answer)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _normalize_math(answer: str) -> str:
    s = answer.strip().strip("$").strip()
    s = _SPACING.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s).replace("\\%", "").replace("%", "").replace("\\$", "")
    whole_text = _TEXT_WRAPPER.fullmatch(s.strip())
    if whole_text:
        s = whole_text.group(1)
    for unit in (_UNIT_TEXT, _UNIT_WORD):
        if match := unit.match(s.strip()):
            s = match.group("value")
    s = _COMMAND_SPACE.sub(lambda m: m.group(1) + "\0", s)
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = _unwrap_braces(s)
    s = s.rstrip(".").replace("{,}", ",")
    s = re.sub(r"^(-?)\.(?=\d)", r"\g<1>0.", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _DECIMAL.match(s):
        s = s.rstrip("0").rstrip(".")
    if _INTEGER.match(s):  # by string, not int(): Python refuses int() of over 4300 digits
        s = _LEADING_ZEROS.sub(r"\1", s)
        s = "0" if s == "-0" else s
    return s


def _unwrap_braces(s: str) -> str:
    """s without the brace groups that wrap all of it (`{{5}}` -> `5`; `{1}{2}` stays), in one pass.

    Braces are matched as `_braced` matches them (nesting, escaped braces skipped)."""
    if not s.startswith("{"):
        return s
    opens: list[int] = []
    close_of: dict[int, int] = {}
    for token in _BRACE_TOKEN.finditer(s):
        if token.group() == "{":
            opens.append(token.start())
        elif token.group() == "}" and opens:
            close_of[opens.pop()] = token.start()
    first, last = 0, len(s) - 1
    while first < last and s[first] == "{" and close_of.get(first) == last:
        first, last = first + 1, last - 1
    return s[first : last + 1]


def normalize_answer(answer: str, answer_type: AnswerType, letters: str = "ABCDEFGHIJ") -> str:
    """Normalised form of a raw answer ("" stays ""): `normalize_math`, or the upper-case option letter."""
    if answer_type == "choice":
        return choice_letter(_TEXT_WRAPPER.sub(r"\1", answer).upper(), letters)
    return normalize_math(answer)


def canonical_key(answer: str) -> tuple[int, str]:
    """Sort key of the canonical order: shorter first, then lexicographic."""
    return len(answer), answer


# ------------------------------------------------------------------------------------------- equivalence


def _with_time_limit(call: Callable[[int | None], T], timeout_s: int, on_timeout: T) -> T:
    """call(timeout) under a limit of timeout_s seconds, in any thread (see the module docstring)."""
    if threading.current_thread() is threading.main_thread():
        return call(timeout_s)  # math-verify's own SIGALRM limit
    result: list[T] = [on_timeout]
    helper = threading.Thread(target=lambda: result.__setitem__(0, call(None)), daemon=True)
    helper.start()
    helper.join(timeout_s)
    if helper.is_alive():
        logger.warning("math-verify call exceeded %ss outside the main thread; abandoned", timeout_s)
        return on_timeout
    return result[0]


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parsed(answer: str, timeout_s: int) -> tuple:
    """math-verify's parse of a normalised answer (a box makes it read the whole string as LaTeX)."""
    return tuple(
        _with_time_limit(
            lambda limit: mv_parse(f"\\boxed{{{answer}}}", parsing_timeout=limit), timeout_s, on_timeout=[]
        )
    )


@functools.lru_cache(maxsize=_CACHE_SIZE)
def math_equivalent(representative: str, candidate: str, timeout_s: int = 5, max_chars: int = 512) -> bool:
    """Whether two distinct normalised maths answers are the same value.

    Two integers (normalised, so without leading zeros) are equal only as strings; answers longer than
    max_chars are compared as strings only; otherwise math-verify decides, with `representative` as its gold
    side (it is not symmetric for assignments such as "x=5"), under a time limit of timeout_s per parse and
    per comparison. Results are cached.
    """
    if representative == candidate:
        return True
    both_integers = _INTEGER.match(representative) and _INTEGER.match(candidate)
    if both_integers or max(len(representative), len(candidate)) > max_chars:
        return False
    gold, target = _parsed(representative, timeout_s), _parsed(candidate, timeout_s)
    if not gold or not target:
        return False
    return _with_time_limit(
        lambda limit: mv_verify(list(gold), list(target), timeout_seconds=limit), timeout_s, on_timeout=False
    )


def cluster_answers(
    answers: Sequence[str], answer_type: AnswerType, timeout_s: int = 5, max_chars: int = 512
) -> list[int]:
    """Class index of each answer. answers: distinct non-empty normalised strings in canonical order.

    Greedy, deterministic: each answer joins the first earlier class whose representative (first member) it is
    equivalent to, else opens a new class; classes are thus numbered in canonical order. Choice letters are
    only equal to themselves, so they are their own classes. Cost: one comparison per (answer, earlier class),
    most of them cached or decided without math-verify.
    """
    if answer_type == "choice":
        return list(range(len(answers)))
    firsts: list[str] = []
    classes: list[int] = []
    for answer in answers:
        index = _first_equivalent(answer, firsts, timeout_s, max_chars)
        if index < 0:
            index = len(firsts)
            firsts.append(answer)
        classes.append(index)
    return classes


def _first_equivalent(answer: str, firsts: Sequence[str], timeout_s: int, max_chars: int) -> int:
    """Index of the first class representative `answer` is equivalent to, -1 if none."""
    return next((i for i, rep in enumerate(firsts) if math_equivalent(rep, answer, timeout_s, max_chars)), -1)


def representatives(answers: Sequence[str], classes: Sequence[int]) -> list[str]:
    """The first member of each class, by class index (answers and classes as in `cluster_answers`)."""
    firsts: list[str] = []
    for answer, cls in zip(answers, classes, strict=True):
        if cls == len(firsts):
            firsts.append(answer)
    return firsts


def find_class(
    answer: str,
    answers: Sequence[str],
    classes: Sequence[int],
    answer_type: AnswerType,
    timeout_s: int = 5,
    max_chars: int = 512,
) -> int:
    """Class of a normalised answer among clustered `answers` (classes as `cluster_answers` returned them).

    -1 if it is empty or equivalent to no class. An answer that is a member belongs to that member's class;
    otherwise it is compared with each class representative. Used for the ground truth, which is matched
    after the classes are formed so that it never influences them.
    """
    if not answer:
        return -1
    if answer in answers:
        return classes[answers.index(answer)]
    if answer_type == "choice":
        return -1
    return _first_equivalent(answer, representatives(answers, classes), timeout_s, max_chars)
