"""cDPO's GSM8K grading: the answer a completion states and whether it equals the reference.

Lin et al., "Critical Tokens Matter" (chenzhiling9954/Critical-Tokens-Matter) score every
rollout as `src/utils/utils.py::multi_result_check` does: cut the completion at the first
"\\n\\nQuestion:" and then at "\\n\\nProblem:" (the few-shot format's next question, also their
vLLM stop strings), extract the answer with `src/utils/parser.py::extract_answer_by_question_source`
(GSM8K) and compare it with `src/utils/grader.py::math_equal`. The extraction: when the text holds
"he answer is " (the leading letter dropped, so "The" and "the" both count; the trailing space
required), the text between its first and second occurrence, with "$", "€", "£" and "," removed,
gives its first match of `-?\\d*\\.?\\d+` (so "1,000" is 1000, ".5" is 0.5, "-3" is -3 and "3/4"
is 3); otherwise the last match in the whole cut text; no match is the empty answer, never
correct. The comparison: equal strings, else both parsed as floats (with "," and "%" removed)
and `math.isclose(g, answer, rel_tol=1e-4)` for g in (ref / 100, ref, ref * 100): their
`include_percentage=True`, so 4200 and 0.42 both match a reference of 42. math_equal's symbolic
branch (sympy) is not followed: an extracted answer is a plain number or empty, so only a
non-numeric reference could reach it, and that is compared as a string here.
"""
from __future__ import annotations

import math
import re

CUTS = ("\n\nQuestion:", "\n\nProblem:")  # multi_result_check, in this order
STATED = "he answer is "  # extract_answer_by_question_source (GSM8K)
REMOVED = ("$", "€", ",", "£")
NUMBER = re.compile(r"-?\d*\.?\d+")


def cut(completion: str) -> str:
    """The completion up to the first "\\n\\nQuestion:", then up to the first "\\n\\nProblem:"."""
    for marker in CUTS:
        completion = completion.split(marker)[0]
    return completion


def _clean(text: str) -> str:
    for char in REMOVED:
        text = text.replace(char, "")
    return text


def extract_answer(completion: str) -> str:
    """The answer the completion states, as their GSM8K extraction finds it ("" when none)."""
    text = cut(completion)
    if STATED in text:
        found = NUMBER.findall(_clean(text.split(STATED)[1]))
        return found[0] if found else ""
    found = NUMBER.findall(_clean(text))
    return found[-1] if found else ""


def _as_float(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("%", ""))
    except ValueError:
        return None


def math_equal(answer: str, reference: str, *, percentage: bool = True,
               rel_tol: float = 1e-4) -> bool:
    """Their `math_equal` on a number string: equal strings, else close floats.

    Args:
        answer: an extracted answer (`extract_answer`); "" is never correct.
        reference: the task's answer.
        percentage: also accept reference / 100 and reference * 100 (their default).
        rel_tol: `math.isclose` tolerance (theirs: 1e-4).
    """
    if answer == reference:
        return True
    got, want = _as_float(answer), _as_float(reference)
    if got is None or want is None:
        return False
    targets = (want / 100, want, want * 100) if percentage else (want,)
    return any(math.isclose(t, got, rel_tol=rel_tol) for t in targets)


def answer_done(completion: str) -> bool:
    """True once more text cannot change `extract_answer(completion)`.

    That is: a cut marker has appeared; or, after the first "he answer is ", the first number
    is followed by a character that cannot continue it (after the removed characters are
    dropped: a "." is only final when something follows it); or a second "he answer is "
    closes a first statement that holds no number. Without "he answer is " the last number
    counts and the verdict stays open.
    """
    if any(marker in completion for marker in CUTS):
        return True
    parts = completion.split(STATED)
    if len(parts) < 2:
        return False
    if len(parts) > 2:
        return True
    segment = _clean(parts[1])
    match = NUMBER.search(segment)
    if match is None:
        return False
    rest = segment[match.end():]
    return bool(rest) and rest != "."
