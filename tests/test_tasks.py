"""Tasks and verifiers: built-in verdicts, answer completion, the shipped arithmetic set."""
from __future__ import annotations

import json
import re

import pytest

from tokenprobe.analyses.critical.tasks import (ExactString, FinalNumber, Regex, load_tasks,
                                                prompt_ids)


def test_final_number_verdicts():
    v = FinalNumber("42")
    assert v("27 + 15 = 42. The answer is 42.")
    assert v("The answer is: $42")
    assert not v("The answer is 41. Wait, 42.")  # the stated answer counts
    assert v("so 27 + 15 = 42")  # no stated answer: the last number
    assert not v("no number here")
    assert FinalNumber("1234")("The answer is 1,234.")


def test_final_number_done_waits_for_the_whole_number():
    v = FinalNumber("42")
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
