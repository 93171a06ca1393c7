"""Answer rules (LLM-Adapters) and the evaluation-set loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grass_ft import data as data_mod
from grass_ft.data import DataError
from grass_ft.evaluation.evalsets import load_bigbench, load_eval_data, load_eval_file, load_eval_sets
from grass_ft.base.tasks import (KNOWN_TASKS, TASK_CHOICES, canonical_task, choice_target, choices_for,
                            extract_answer, gold_answer, is_correct, parse_gold)

DATA = Path(__file__).parent / "data"

NUMERIC = ["gsm8k", "svamp", "addsub", "multiarith", "singleeq"]

# (task, generated text, gold, expected extracted, expected correct)
CASES = [
    # numbers: commas stripped, last number wins, negatives and decimals, 0.001 tolerance
    ("gsm8k", "He pays $192 * 12 = $2,304 a year. The answer is $2,304.", "2304", 2304.0, True),
    ("gsm8k", "1,234,567 stars", 1234567, 1234567.0, True),
    ("gsm8k", "It drops to -7 degrees.", "-7", -7.0, True),
    ("gsm8k", "Each piece is 3.75 m long.", 3.75, 3.75, True),
    ("gsm8k", "So 3.7505", "3.75", 3.7505, True),       # within 0.001
    ("gsm8k", "So 3.752", "3.75", 3.752, False),        # outside 0.001
    ("gsm8k", "The answer is 18.", "18", 18.0, True),   # trailing full stop kept by the regex, still 18.0
    ("gsm8k", "First 5, then 7, finally 12", "5", 12.0, False),  # last number, not first
    ("gsm8k", "I do not know.", "4", None, False),     # no number at all
    ("gsm8k", "", "4", None, False),
    ("gsm8k", "5-3", "-3", -3.0, True),                 # LLM-Adapters' regex reads "-3" as the last number
    ("gsm8k", "The answer is 2304", [2304.0], 2304.0, True),   # list gold, as in their test.json
    ("gsm8k", "The answer is 2304", "[2304.0]", 2304.0, True),  # str() of a list gold
    ("gsm8k", "The answer is 1,000", "1,000", 1000.0, True),   # commas in the gold too
    ("svamp", "7 + 5 = 12", "12.0", 12.0, True),
    ("addsub", "total 0", "0", 0.0, True),
    ("multiarith", "-0.5", "-0.5", -0.5, True),
    ("singleeq", "x = 10 so 20", "10", 20.0, False),
    ("gsm_symbolic", "The answer is 288", "288", 288.0, True),
    # AQuA: first upper-case A-E anywhere, exactly like LLM-Adapters' re.findall(r'A|B|C|D|E')
    ("aqua", "The answer is (C).", "C", "C", True),
    ("aqua", "(B) then (D)", "B", "B", True),
    ("aqua", "After checking, (C)", "C", "A", False),   # the quirk: the "A" of "After"
    ("aqua", "the answer is (f)", "C", None, False),
    ("aqua", "so (E)", ["E"], "E", True),
    ("aqua", "so (E)", "['E']", "E", True),
    # BoolQ: first true/false, case-sensitive
    ("boolq", "the correct answer is true", "true", "true", True),
    ("boolq", "false, not true", "true", "false", False),
    ("boolq", "True", "true", None, False),
    ("boolq", "untrue", "true", "true", True),          # not anchored, as in LLM-Adapters
    ("piqa", "the correct answer is solution2", "solution2", "solution2", True),
    ("piqa", "solution1 or solution2", "solution2", "solution1", False),
    ("piqa", "solution3", "solution1", None, False),
    ("siqa", "the correct answer is answer3", "answer3", "answer3", True),
    ("arc-e", "answer5", "answer5", "answer5", True),
    ("arc-c", "answer4 answer1", "answer1", "answer4", False),
    ("obqa", "the correct answer is answer", "answer1", None, False),
    ("hellaswag", "ending4", "ending4", "ending4", True),
    ("hellaswag", "ending5 then ending2", "ending2", "ending2", True),
    ("winogrande", "option2", "option2", "option2", True),
    ("winogrande", "Option2", "option2", None, False),
    ("bigbench", "the correct answer is answer10", "answer10", "answer10", True),
    ("bigbench", "answer1", "answer10", "answer1", False),
    # aliases work inside the rules
    ("ARC-Easy", "answer2", "answer2", "answer2", True),
    ("social_i_qa", "answer1", "answer1", "answer1", True),
]


@pytest.mark.parametrize("task,text,gold,extracted,correct", CASES)
def test_answer_rules(task, text, gold, extracted, correct):
    assert extract_answer(task, text) == extracted
    assert is_correct(task, text, gold) is correct


@pytest.mark.parametrize("task", NUMERIC)
def test_numeric_tasks_share_the_rule(task):
    text = "a 1,000 b -2.5 c 42"
    assert extract_answer(task, text) == 42.0
    assert is_correct(task, text, "42.0005")
    assert not is_correct(task, text, "42.002")


@pytest.mark.parametrize("alias,canonical", [
    ("social_i_qa", "siqa"), ("ARC-Easy", "arc-e"), ("ARC-Challenge", "arc-c"), ("openbookqa", "obqa"),
    ("AddSub", "addsub"), ("MultiArith", "multiarith"), ("SingleEq", "singleeq"), ("SVAMP", "svamp"),
    ("AQuA", "aqua"), ("gsm8k", "gsm8k"), ("GSM8K", "gsm8k"), ("boolq", "boolq"), ("piqa", "piqa"),
    ("hellaswag", "hellaswag"), ("HellaSwag", "hellaswag"), ("winogrande", "winogrande"), ("ARC-E", "arc-e"),
    (" obqa ", "obqa"),
])
def test_aliases(alias, canonical):
    assert canonical_task(alias) == canonical


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match=r"no answer rule for task 'mmlu'; known tasks: gsm8k, svamp.*aqua"):
        canonical_task("mmlu")
    with pytest.raises(ValueError, match="known tasks"):
        extract_answer("squad", "text")
    with pytest.raises(ValueError, match="known tasks"):
        is_correct("squad", "text", "x")


def test_every_generator_dataset_has_a_rule():
    # data.GENERATORS tags examples with their reasoning-gym dataset name; each must be scoreable
    for parts in data_mod.GENERATORS.values():
        for part in parts:  # (reasoning-gym dataset, share, ...)
            assert canonical_task(part[0]) in KNOWN_TASKS


def test_gold_parsing():
    assert gold_answer([2304.0]) == "2304"
    assert gold_answer("['C']") == "C"
    assert gold_answer(" answer2 ") == "answer2"
    assert gold_answer([]) == ""
    assert parse_gold("gsm8k", "$1,234") == 1234.0
    with pytest.raises(ValueError, match=r"gold answer 'n/a' for task 'gsm8k' holds no number"):
        parse_gold("gsm8k", "n/a")
    with pytest.raises(ValueError, match=r"gold answer for task 'piqa' is empty; expected one of"):
        parse_gold("piqa", "")


def test_choices():
    assert TASK_CHOICES["piqa"] == ["solution1", "solution2"]
    assert TASK_CHOICES["boolq"] == ["true", "false"]
    assert choice_target("answer2") == "the correct answer is answer2"
    # the instruction's "Answer format:" line sets the option count (ARC has 3-5 options)
    ex = {"instruction": "Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"}
    assert choices_for(ex, "arc-e") == ["answer1", "answer2", "answer3"]
    assert choices_for({"instruction": "Q?"}, "arc-c") == TASK_CHOICES["arc-c"]
    assert choices_for({"instruction": "Q?", "choices": ["answer1", "answer2"]}, "bigbench") == ["answer1", "answer2"]
    # a format line with labels the rule cannot read falls back to the task's list
    assert choices_for({"instruction": "Answer format: A/B"}, "piqa") == ["solution1", "solution2"]
    with pytest.raises(ValueError, match="task 'gsm8k' has no fixed answer options.*mode='generate'"):
        choices_for({"instruction": "What is 2+2?"}, "gsm8k")
    with pytest.raises(ValueError, match="task 'aqua' has no fixed answer options"):
        choices_for({"instruction": "Answer Choices: (A) 1 (B) 2"}, "aqua")


# ------------------------------------------------------------------------------------------------ loaders


def test_load_eval_sets_directory_layout(caplog):
    sets = load_eval_sets(DATA / "llm_adapters")
    assert set(sets) == {"arc-e", "gsm8k"}  # unknown folder skipped, folder without test.json ignored
    assert "mawps_like_unknown" in caplog.text
    assert [ex["task"] for ex in sets["arc-e"]] == ["arc-e"] * 3
    assert [ex["answer"] for ex in sets["gsm8k"]] == ["21", "950", "3.75"]  # list golds reduced
    assert is_correct("gsm8k", "The answer is 950", sets["gsm8k"][1]["answer"])
    only = load_eval_sets(DATA / "llm_adapters", tasks=["ARC-Easy"])
    assert list(only) == ["arc-e"]
    one = load_eval_sets(DATA / "llm_adapters" / "gsm8k")  # a task folder itself
    assert list(one) == ["gsm8k"] and len(one["gsm8k"]) == 3


def test_load_eval_sets_errors(tmp_path):
    with pytest.raises(DataError, match=r"no <task>/test.json for boolq; found: ARC-Easy \(arc-e\), gsm8k"):
        load_eval_sets(DATA / "llm_adapters", tasks=["boolq"])
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        load_eval_sets(tmp_path / "nope")
    with pytest.raises(DataError, match="for any task; found: none"):
        load_eval_sets(tmp_path)
    with pytest.raises(ValueError, match="known tasks"):
        load_eval_sets(DATA / "llm_adapters", tasks=["mmlu"])


def test_load_eval_file_jsonl_keeps_example_tasks():
    exs = load_eval_file(DATA / "commonsense_mc.jsonl", task="boolq")
    assert len(exs) == 8
    assert [ex["task"] for ex in exs][:4] == ["boolq", "boolq", "piqa", "social_i_qa"]
    # a JSON list file without task keys takes the given task
    arc = load_eval_file(DATA / "llm_adapters" / "ARC-Easy" / "test.json", task="ARC-Easy")
    assert {ex["task"] for ex in arc} == {"arc-e"}


def test_load_bigbench():
    exs = load_bigbench(DATA / "bigbench_tiny" / "task.json")
    assert len(exs) == 3  # the example with two top scores is skipped
    first, second, third = exs
    assert first["instruction"] == ("Please choose the correct answer to the question: The glass fell off the table, "
                                    "so it\n\nAnswer1: broke. Answer2: sang.\n\nAnswer format: answer1/answer2")
    assert first["answer"] == "answer1" and first["output"] == "the correct answer is answer1"
    assert second["answer"] == "answer2" and second["choices"] == ["answer1", "answer2", "answer3"]
    assert third["answer"] == "answer7" and third["task"] == "bigbench"
    assert is_correct("bigbench", third["output"], third["answer"])
    assert load_bigbench(DATA / "bigbench_tiny")[0] == first  # folder form


def test_load_bigbench_errors(tmp_path):
    with pytest.raises(DataError, match="example 3 has 7 options, which task 'siqa' cannot score"):
        load_bigbench(DATA / "bigbench_tiny", task="siqa")
    gen = tmp_path / "task.json"
    gen.write_text(json.dumps({"examples": [{"input": "2+2=", "target": "4"}]}))
    with pytest.raises(DataError, match="generative BIG-bench tasks are not supported"):
        load_bigbench(gen)
    with pytest.raises(DataError, match="does not exist"):
        load_bigbench(tmp_path / "missing.json")


def test_load_eval_data_dispatch():
    assert len(load_eval_data(DATA / "llm_adapters", n=2)) == 4  # first 2 of each of 2 tasks
    assert len(load_eval_data(DATA / "llm_adapters", task="gsm8k")) == 3
    assert len(load_eval_data(DATA / "bigbench_tiny" / "task.json")) == 3
    mc = load_eval_data(DATA / "commonsense_mc.jsonl", n=1)
    assert [ex["task"] for ex in mc] == ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "openbookqa",
                                         "ARC-Challenge"]
    with pytest.raises(DataError, match=r"neither a file, a folder nor a generator.*gsm_symbolic"):
        load_eval_data("no_such_thing")
    with pytest.raises(DataError, match="eval_samples must be a positive number"):
        load_eval_data(DATA / "commonsense_mc.jsonl", n=0)


def test_load_eval_data_generator_uses_held_out_seeds():
    held = load_eval_data("gsm_symbolic", n=3, seed=5)
    assert held == data_mod.generate_examples("gsm_symbolic", 3, 5 + data_mod.EVAL_SEED_OFFSET)
    train = data_mod.generate_examples("gsm_symbolic", 3, 5)
    assert not {ex["instruction"] for ex in held} & {ex["instruction"] for ex in train}
    assert all(is_correct(ex["task"], ex["output"], ex["answer"]) for ex in held)
    with pytest.raises(DataError, match="needs a number of examples"):
        load_eval_data("gsm_symbolic")
