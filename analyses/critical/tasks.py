"""Verifiable tasks for rollout search: a prompt, an optional given trajectory, and a verifier.

A verifier is any Python callable `verifier(completion: str) -> bool`. It may also have a
`done(completion: str) -> bool` method saying that the verdict can no longer change, so a sampler
can stop a continuation there instead of at EOS (cDPO's rollouts, Lin et al., "Critical Tokens
Matter", chenzhiling9954/Critical-Tokens-Matter, score each continuation by its final answer
only).

Built-in verifiers: `FinalNumber` (the authors' GSM8K grading: the first number after the first
"he answer is ", else the last number, compared as math values), `FinalNumberLast` (the number
after the last "answer is"), `ExactString` (whitespace-normalised equality) and `Regex` (a
pattern search). Task files are JSONL, one object per line::

    {"id": "add-01", "question": "...", "answer": "42", "verifier": "final_number"}

with optional `"trajectory"` (a response to analyse instead of sampling one) and, for the
regex verifier, `"pattern"`. The shipped set is `tokenprobe/data/tasks/arithmetic.jsonl`.
"""
from __future__ import annotations

import importlib.resources
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from tokenprobe.analyses.critical.grading import answer_done, extract_answer, math_equal
from tokenprobe.jsonl import iter_jsonl

# A short answer keeps trajectories short (the search samples every needed prefix); an
# instruction mentioning a placeholder ("The answer is N.") made SmolLM2-135M talk about N.
INSTRUCTION = 'Answer briefly and end with "The answer is" followed by the number.'
_NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"  # "1,234", "-3", "2.5", ".5"
ANSWER = re.compile(r"answer is\s*[:=]?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
NUMBER = re.compile(_NUMBER)
BUILTIN = "arithmetic"


class Verifier(Protocol):
    """Says whether a completion is correct; see the module docstring."""

    def __call__(self, completion: str) -> bool: ...


def _as_float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


@dataclass(frozen=True)
class FinalNumber:
    """Correct when the stated answer equals `expected` as a math value: cDPO's GSM8K grading.

    As the authors' code has it (`tokenprobe.analyses.critical.grading`: Critical-Tokens-Matter
    `src/utils/utils.py::multi_result_check`, `src/utils/parser.py::
    extract_answer_by_question_source`, `src/utils/grader.py::math_equal`): cut at
    "\\n\\nQuestion:", take the first number after the first "he answer is ", else the last
    number, and compare within a relative 1e-4, also against `expected` / 100 and * 100
    (`percentage`). `done` once that answer can no longer change.
    """

    expected: str
    percentage: bool = True
    rel_tol: float = 1e-4

    def __call__(self, completion: str) -> bool:
        return math_equal(extract_answer(completion), self.expected,
                          percentage=self.percentage, rel_tol=self.rel_tol)

    def done(self, completion: str) -> bool:
        return answer_done(completion)


@dataclass(frozen=True)
class FinalNumberLast:
    """Correct when the last stated answer equals `expected` as a number (ours, not cDPO's).

    The final answer is the number after the last "answer is" (so a restated answer counts);
    without one, the last number in the completion; no cut, no percentage match. The answer is
    complete (`done`) once "answer is N" is followed by a character that cannot continue the
    number.
    """

    expected: str

    def __call__(self, completion: str) -> bool:
        found = ANSWER.findall(completion) or NUMBER.findall(completion)
        if not found:
            return False
        got, want = _as_float(found[-1].rstrip(".,")), _as_float(self.expected)
        return got is not None and want is not None and abs(got - want) < 1e-9

    def done(self, completion: str) -> bool:
        match = None
        for match in ANSWER.finditer(completion):
            pass
        if match is None:
            return False
        rest = completion[match.end():]
        return bool(rest) and not rest[0].isdigit() and not (
            rest[0] in ".," and (len(rest) == 1 or rest[1].isdigit()))


@dataclass(frozen=True)
class ExactString:
    """Correct when the completion, whitespace-normalised, equals `expected`."""

    expected: str

    def __call__(self, completion: str) -> bool:
        return " ".join(completion.split()) == " ".join(self.expected.split())


@dataclass(frozen=True)
class Regex:
    """Correct when `pattern` occurs in the completion (`re.search`)."""

    pattern: str

    def __call__(self, completion: str) -> bool:
        return re.search(self.pattern, completion) is not None


VERIFIERS: dict[str, Callable[[dict], Verifier]] = {
    "final_number": lambda item: FinalNumber(str(item["answer"])),
    "final_number_last": lambda item: FinalNumberLast(str(item["answer"])),
    "exact_string": lambda item: ExactString(str(item["answer"])),
    "regex": lambda item: Regex(item["pattern"]),
}


@dataclass(frozen=True)
class Task:
    """One verifiable task.

    Attributes:
        task_id: a name unique within its task set.
        question: the user's message (the chat template and `INSTRUCTION` are added by
            `prompt_ids`), or with `raw=True` the whole prompt text.
        verifier: callable on a completion (the response text), True when correct.
        answer: the reference answer, for display.
        trajectory: a given response to analyse; None to sample one.
        raw: the question is used as the prompt text as is (no chat template).
    """

    task_id: str
    question: str
    verifier: Verifier
    answer: str = ""
    trajectory: str | None = None
    raw: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def parse_task(item: dict, *, where: str = "task") -> Task:
    """A `Task` from one JSON object of a task file; ValueError says what is wrong."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object")  # noqa: TRY004 (a bad file)
    missing = [k for k in ("id", "question") if k not in item]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    kind = item.get("verifier", "final_number")
    if kind not in VERIFIERS:
        raise ValueError(f"{where}: unknown verifier {kind!r}; built-ins: {', '.join(VERIFIERS)}")
    try:
        verifier = VERIFIERS[kind](item)
    except KeyError as err:
        raise ValueError(f"{where}: verifier {kind!r} needs field {err}") from err
    return Task(str(item["id"]), item["question"], verifier, str(item.get("answer", "")),
                item.get("trajectory"), bool(item.get("raw", False)),
                {k: v for k, v in item.items() if k not in
                 ("id", "question", "answer", "verifier", "trajectory", "raw", "pattern")})


def load_tasks(path: str | Path = BUILTIN) -> list[Task]:
    """Tasks from a JSONL file, or the shipped set named `arithmetic`.

    Raises:
        ValueError: unreadable file, bad JSON, a bad task, duplicate ids, or no tasks.
    """
    if str(path) == BUILTIN:
        text = (importlib.resources.files("tokenprobe") / "data" / "tasks" /
                f"{BUILTIN}.jsonl").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read task file {path}: {err}") from err
    tasks = [parse_task(item, where=f"{path}:{n}") for n, item in iter_jsonl(text, path)]
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate task ids")
    if not tasks:
        raise ValueError(f"{path}: holds no tasks")
    return tasks


def prompt_ids(tokenizer: PreTrainedTokenizerBase, task: Task) -> list[int]:
    """Token ids of the task's prompt: the chat template (with the generation prompt) around
    the question and `INSTRUCTION` when the tokenizer has one, else the plain question."""
    if task.raw or not getattr(tokenizer, "chat_template", None):
        text = task.question if task.raw else f"{task.question}\n{INSTRUCTION}\n"
        return list(tokenizer(text)["input_ids"])
    messages = [{"role": "user", "content": f"{task.question}\n{INSTRUCTION}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def stopper(verifier: Verifier) -> Callable[[str], bool] | None:
    """The verifier's `done` method if it has one (where a continuation may stop early)."""
    return getattr(verifier, "done", None)
