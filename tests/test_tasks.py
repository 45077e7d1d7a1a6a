"""Tasks and verifiers: built-in verdicts, answer completion, the shipped arithmetic set."""
from __future__ import annotations

import json
import math
import random
import re

import pytest

from tokenprobe.analyses.critical.grading import answer_done, extract_answer
from tokenprobe.analyses.critical.tasks import (ExactString, FinalNumber, FinalNumberLast, Regex,
                                                load_tasks, parse_task, prompt_ids)


def authors_gsm8k_label(completion: str, gold: str) -> bool:
    """Critical-Tokens-Matter's verdict on one GSM8K rollout, re-implemented from its code:
    src/utils/utils.py multi_result_check (cut at "\n\nQuestion:", then "\n\nProblem:"),
    src/utils/parser.py extract_answer_by_question_source (question_source "GSM8K") and
    src/utils/grader.py math_equal with its defaults (string equality, else floats within
    rel_tol 1e-4 of gold / 100, gold or gold * 100; the sympy branch never matters for a
    numeric gold)."""
    text = completion.split("\n\nQuestion:")[0].split("\n\nProblem:")[0]
    pred = ""
    if "he answer is " in text:
        part = text.split("he answer is ")[1]
        for ch in ("$", "€", ",", "£"):
            part = part.replace(ch, "")
        found = re.findall(r"-?\d*\.?\d+", part)
        pred = found[0] if found else pred
    else:
        for ch in ("$", "€", ",", "£"):
            text = text.replace(ch, "")
        found = re.findall(r"-?\d*\.?\d+", text)
        pred = found[-1] if found else pred
    if pred == gold:
        return True
    if not pred:
        return False
    ref = float(gold.replace(",", "").replace("%", ""))
    return any(math.isclose(g, float(pred), rel_tol=1e-4) for g in (ref / 100, ref, ref * 100))


# (completion, gold, the authors' verdict); what each case pins is in its comment
GSM8K_CASES = [
    ("27 + 15 = 42. The answer is 42.", "42", True),
    ("The answer is .5", "0.5", True),  # ".5" is 0.5 ...
    ("The answer is .5", "5", False),  # ... not 5
    ("The answer is 7.\n\nQuestion: What is 4 + 5?\nAnswer: The answer is 9.", "7", True),
    ("The answer is 7.\n\nQuestion: What is 4 + 5?\nAnswer: The answer is 9.", "9", False),
    ("3 + 4 = 7\n\nQuestion: What is 4 + 5?\nAnswer: 9", "7", True),  # cut, then last number
    ("3 + 4 = 7\n\nProblem: 9", "7", True),
    ("The answer is 41. No, the answer is 42.", "41", True),  # the first statement counts
    ("The answer is 41. No, the answer is 42.", "42", False),
    ("The answer is unclear. The answer is 42.", "42", False),  # first statement, no number
    ("so 27 + 15 = 42 marbles", "42", True),  # no statement: the last number
    ("so 42 - 1 = 41", "42", False),
    ("My answer is 41, since 40 + 2 = 42", "42", True),  # "answer is" alone is no statement
    ("so the answer is 42", "42", True),  # "he answer is ": any case of the t
    ("The answer is 1,000.", "1000", True),
    ("The answer is $1,000.", "1000", True),
    ("The answer is 1,000,000", "1000000", True),
    ("The answer is -3.", "-3", True),
    ("The answer is -3.", "3", False),
    ("It fell by -12 degrees", "-12", True),
    ("The answer is 2.50 dollars", "2.5", True),
    ("The answer is 3/4", "3", True),  # the first number of a fraction
    ("The answer is 3/4", "0.75", False),
    ("The answer is 4200", "42", True),  # math_equal's include_percentage
    ("The answer is 0.42", "42", True),
    ("The answer is 3.0001", "3", True),  # rel_tol 1e-4
    ("The answer is 3.001", "3", False),
    ("no number here", "42", False),
    ("", "0", False),
]


@pytest.mark.parametrize("completion, gold, verdict", GSM8K_CASES)
def test_final_number_is_the_authors_gsm8k_grading(completion, gold, verdict):
    assert authors_gsm8k_label(completion, gold) == verdict  # the oracle reads their code so
    assert FinalNumber(gold)(completion) == verdict


def test_final_number_agrees_with_the_authors_on_random_completions():
    rng = random.Random(0)
    parts = ["The answer is ", "the answer is ", "answer is ", "\n\nQuestion:", "\n\nProblem:",
             "4", "2", "0", ".", ",", "$", "-", " ", "/", "x", "\n", "%"]
    for _ in range(3000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        for gold in ("42", "4.2", "-2", "0", "4200"):
            assert FinalNumber(gold)(text) == authors_gsm8k_label(text, gold), (text, gold)


def test_final_number_done_only_when_the_answer_is_final():
    for text in ("The answer is 4", "The answer is 42", "The answer is 42.", "The answer is 1,",
                 "The answer is $", "so 42.", "The answer is -", "The answer is x"):
        assert not answer_done(text), text
    for text in ("The answer is 42. ", "The answer is 42.5 ", "The answer is 42\n",
                 "The answer is .5x", "x\n\nQuestion:", "The answer is x. The answer is "):
        assert answer_done(text), text
    rng = random.Random(1)  # once done, no continuation changes the answer
    parts = ["The answer is ", "\n\nQuestion:", "4", "2", ".", ",", "$", "-", " ", "x"]
    for _ in range(2000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 10)))
        for i in range(len(text) + 1):
            if answer_done(text[:i]):
                assert extract_answer(text[:i]) == extract_answer(text), (text, i)
                break


def test_final_number_last_verdicts():
    v = FinalNumberLast("42")
    assert v("27 + 15 = 42. The answer is 42.")
    assert v("The answer is: $42")
    assert not v("The answer is 41. Wait, 42.")  # the stated answer counts
    assert v("The answer is 41. No, the answer is 42.")  # the last statement counts
    assert v("so 27 + 15 = 42")  # no stated answer: the last number
    assert not v("no number here")
    assert FinalNumberLast("1234")("The answer is 1,234.")
    assert FinalNumberLast("0.5")("The answer is .5")  # was read as 5
    assert not FinalNumberLast("5")("The answer is .5")
    assert not v("The answer is 4200")  # no percentage match
    assert parse_task({"id": "a", "question": "q", "answer": "42",
                       "verifier": "final_number_last"}).verifier == v


def test_final_number_last_done_waits_for_the_whole_number():
    v = FinalNumberLast("42")
    assert not v.done("The answer is 4")
    assert not v.done("The answer is 42")
    assert not v.done("The answer is 42.")  # could be 42.5
    assert v.done("The answer is 42. ")
    assert v.done("The answer is 42.5 ")
    assert not v.done("The answer is 1,")
    assert v.done("The answer is 42\n")
    assert not v.done("so 42.")


def test_exact_string_and_regex():
    assert ExactString("Paris")("  Paris\n")
    assert not ExactString("Paris")("Paris.")
    assert Regex(r"\bParis\b")("It is Paris.")
    assert not Regex(r"\bParis\b")("Parisian")


def test_shipped_arithmetic_set():
    tasks = load_tasks("arithmetic")
    assert len(tasks) >= 20
    ops = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
    for task in tasks:
        a, b = (int(x) for x in re.findall(r"\d+", task.question)[:2])
        assert task.answer == str(ops[task.task_id.split("-")[0]](a, b)), task.task_id
        assert task.verifier(f"The answer is {task.answer}.")


def test_task_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "verifier": "nope"}\n')
    with pytest.raises(ValueError, match="unknown verifier"):
        load_tasks(bad)
    bad.write_text('{"id": "a", "question": "q", "verifier": "regex"}\n')
    with pytest.raises(ValueError, match="pattern"):
        load_tasks(bad)
    bad.write_text("\n".join(json.dumps({"id": "a", "question": "q", "answer": "1"})
                             for _ in range(2)))
    with pytest.raises(ValueError, match="duplicate"):
        load_tasks(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_tasks(tmp_path / "missing.jsonl")


@pytest.mark.embedded
def test_prompt_uses_the_chat_template(smollm2):
    task = load_tasks("arithmetic")[0]
    text = smollm2.tokenizer.decode(prompt_ids(smollm2.tokenizer, task))
    assert "<|im_start|>user" in text and task.question in text
    assert text.rstrip().endswith("<|im_start|>assistant")
