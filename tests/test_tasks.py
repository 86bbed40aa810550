import random

import pytest

from jointdlm.data import CORPORA, build_corpus, read_corpus, write_corpus
from jointdlm.data.tasks import (
    DEFAULT_TASK_DOCS,
    NAMES,
    TASKS,
    TaskExample,
    accuracy,
    add_prompt,
    document,
    is_heldout,
    make_examples,
    score_all,
    write_task_prompts,
)

HAND_MADE = [
    ("copy", "copy : ann bob tom =", "ann bob tom"),
    ("reverse", "reverse : ann bob tom =", "tom bob ann"),
    ("sort", "sort : tom ann bob =", "ann bob tom"),
    ("insert", "insert 1 eve : ann bob tom =", "ann eve bob tom"),
    ("insert", "insert 0 eve : ann bob tom =", "eve ann bob tom"),
    ("insert", "insert 3 eve : ann bob tom =", "ann bob tom eve"),
    ("remove", "remove 2 : ann bob tom =", "ann bob"),
    ("remove", "remove 0 : ann bob tom sue =", "bob tom sue"),
    ("replace", "replace 0 max : ann bob tom =", "max bob tom"),
    ("add", "add : 4 7 2 + 3 9 1 =", "8 6 3"),
    ("add", "add : 9 9 9 + 1 =", "1 0 0 0"),
    ("add", "add : 5 5 5 + 5 5 5 =", "1 1 1 0"),
]


@pytest.fixture(params=sorted(TASKS))
def task(request):
    return TASKS[request.param]


def test_generated_answers_pass_their_own_scorer(task):
    rng = random.Random(0)
    for _ in range(300):
        example = task.make(rng)
        assert example.task == task.name
        assert example.prompt.startswith(task.name + " ") and example.prompt.endswith(" =")
        if task.name == "shuffle":
            assert task.score(example, task.solve(example.prompt))
        else:
            assert task.solve(example.prompt) == example.answer
        assert task.score(example, example.answer)
        assert task.score(example, "  " + example.answer.replace(" ", "   ") + "\n")


def test_list_prompts_use_three_to_five_distinct_names():
    for example in make_examples(["copy", "insert", "remove", "replace"], 400, seed=1):
        items = example.prompt.split(" : ")[1].removesuffix(" =").split()
        assert 3 <= len(items) <= 5 and len(set(items)) == len(items) and set(items) <= set(NAMES)


@pytest.mark.parametrize(("name", "prompt", "answer"), HAND_MADE)
def test_hand_made_answers(name, prompt, answer):
    task = TASKS[name]
    assert task.solve(prompt) == answer
    example = TaskExample(name, prompt, answer)
    assert task.score(example, answer)
    assert task.score(example, f" {answer}  ")
    assert not task.score(example, " ".join(reversed(answer.split())))
    assert not task.score(example, " ".join(answer.split()[:-1]))
    assert not task.score(example, answer + " ann")
    assert not task.score(example, answer.replace(" ", ""))


def test_shuffle_accepts_every_ordering_and_nothing_else():
    task = TASKS["shuffle"]
    example = TaskExample("shuffle", "shuffle : ann bob tom =", "bob tom ann")
    for answer in ["ann bob tom", "tom bob ann", " bob  ann tom ", "tom ann bob"]:
        assert task.score(example, answer), answer
    for answer in ["ann ann bob", "ann bob", "ann bob tom tom", "ann bob sue", ""]:
        assert not task.score(example, answer), answer


def test_shuffle_documents_are_uniform_orderings():
    examples = [e for e in make_examples("shuffle", 3000, seed=6) if len(e.answer.split()) == 3]
    orders = {}
    for e in examples:
        items = e.prompt.removeprefix("shuffle : ").removesuffix(" =").split()
        key = tuple(items.index(name) for name in e.answer.split())
        orders[key] = orders.get(key, 0) + 1
    assert len(orders) == 6, "all 3! orderings must occur"
    assert max(orders.values()) / min(orders.values()) < 1.6, orders


def test_wrong_digit_is_wrong():
    example = TASKS["add"].make(random.Random(5))
    digits = example.answer.split()
    digits[-1] = str((int(digits[-1]) + 1) % 10)
    assert not TASKS["add"].score(example, " ".join(digits))


def test_sort_and_reverse_reject_the_unchanged_list():
    assert not TASKS["sort"].score(TaskExample("sort", "sort : tom ann bob =", "ann bob tom"), "tom ann bob")
    assert not TASKS["reverse"].score(TaskExample("reverse", "reverse : ann bob tom =", "tom bob ann"), "ann bob tom")


@pytest.mark.parametrize(("a", "b"), [(999, 1), (999, 999), (100, 900), (472, 391), (0, 0), (123, 4)])
def test_addition_matches_integer_sum(a, b):
    assert TASKS["add"].solve(add_prompt(a, b)).split() == list(str(a + b))


def test_generated_additions_match_integer_sum_and_carry():
    four_digit = 0
    for example in make_examples("add", 500, seed=2):
        left, right = example.prompt.removeprefix("add : ").removesuffix(" =").split(" + ")
        a, b = int(left.replace(" ", "")), int(right.replace(" ", ""))
        assert 100 <= a <= 999 and 100 <= b <= 999 and len(left.split()) == 3
        assert example.answer == " ".join(str(a + b))
        four_digit += a + b >= 1000
    assert 100 < four_digit < 400


@pytest.mark.parametrize(
    "prompt",
    [
        "reverse ann bob =",
        "insert 9 eve : ann bob tom =",
        "remove 3 : ann bob tom =",
        "add : 1 2 =",
        "copy : ann bob",
        "sort 1 : ann bob =",
    ],
)
def test_malformed_prompts_raise(prompt):
    name = prompt.split()[0]
    with pytest.raises(ValueError):
        TASKS[name].solve(prompt)


def test_documents_are_single_lines():
    for example in make_examples("all", 700, seed=3):
        doc = document(example)
        assert doc == f"{example.prompt} {example.answer}"
        assert len(doc.splitlines()) == 1 and doc.strip() == doc
        assert len(doc.split()) <= 18


def test_make_examples_is_seeded_and_mixes_all_tasks():
    examples = make_examples("all", 70, seed=4)
    assert examples == make_examples("all", 70, seed=4)
    assert examples != make_examples("all", 70, seed=5)
    assert [e.task for e in examples[: len(TASKS)]] == list(TASKS)
    assert {e.task for e in examples} == set(TASKS)
    assert {e.task for e in make_examples(["sort", "add"], 10, seed=4)} == {"sort", "add"}
    assert make_examples("all", 0, seed=0) == []
    with pytest.raises(ValueError, match="unknown task"):
        make_examples("multiply", 3, seed=0)


def test_splits_are_disjoint():
    train = make_examples("all", 3000, seed=0, split="train")
    heldout = make_examples("all", 700, seed=1, split="heldout")
    assert not any(is_heldout(e.prompt) for e in train)
    assert all(is_heldout(e.prompt) for e in heldout)
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    share = sum(map(is_heldout, (e.prompt for e in make_examples("all", 2000, seed=2)))) / 2000
    assert 0.06 < share < 0.14


def test_accuracy_and_score_all():
    examples = make_examples("all", 14, seed=6)
    predictions = [e.answer if i % 2 == 0 else "bob" for i, e in enumerate(examples)]
    assert score_all(examples, predictions) == [i % 2 == 0 for i in range(14)]
    assert accuracy(examples, predictions) == 0.5
    with pytest.raises(ValueError):
        score_all(examples, predictions[:-1])


def test_tasks_corpus_round_trips(tmp_path):
    assert "tasks" in CORPORA
    path = tmp_path / "tasks.txt"
    assert write_corpus("tasks", path, num=500, seed=0) == 500
    docs = read_corpus(path)
    assert docs == build_corpus("tasks", 500, seed=0)
    assert {d.split()[0] for d in docs} == set(TASKS)
    assert len(build_corpus("tasks", None, seed=0)) == DEFAULT_TASK_DOCS


def test_write_task_prompts(tmp_path):
    path = tmp_path / "prompts" / "reverse.txt"
    examples = write_task_prompts("reverse", path, 50, seed=11)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [e.prompt for e in examples]
    assert all(e.task == "reverse" and is_heldout(e.prompt) for e in examples)
    assert examples == make_examples("reverse", 50, seed=11, split="heldout")
    assert write_task_prompts("reverse", tmp_path / "other.txt", 50, seed=12) != examples
