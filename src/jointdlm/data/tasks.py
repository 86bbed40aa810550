"""Short prompted tasks with one exactly checkable answer, small enough for the built-in models.

ParallelBench-style list operations (copy, reverse, sort, insert, remove, replace, shuffle) over a dozen
short names, plus three-digit addition written digit by digit. Every task but `shuffle` has one right
answer, scored by exact match. `shuffle` accepts any ordering of the given names: its answer is a
distribution, so the names a model writes at different positions depend on each other (each name exactly
once), which is what filling positions independently breaks. The check is exact either way, so accuracy
needs no judge.

Prompts look like `reverse : ann bob tom =` and a training document is the prompt, a space and the
answer. Every prompt is assigned to the training or the held-out split by a stable hash of its text, so
evaluation prompts never occur in a training corpus, whatever seeds the two were drawn with.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jointdlm.data.toy import normalize
from jointdlm.outputs import atomic_write_text, check_output_file

NAMES = ("ann", "bob", "tom", "sue", "max", "eve", "joe", "kim", "ian", "amy", "ben", "liz")
MIN_ITEMS, MAX_ITEMS = 3, 5
ADD_DIGITS = 3
MARKER = "="
HELDOUT_PERCENT = 10
DEFAULT_TASK_DOCS = 30000
TRAIN_SEED = 0
EVAL_SEED = 1

Split = Literal["train", "heldout", "any"]


@dataclass(frozen=True)
class TaskExample:
    task: str
    prompt: str
    answer: str


def _render(head: str, body: Sequence[str]) -> str:
    return f"{head} : {' '.join(body)} {MARKER}"


def _parse(prompt: str) -> tuple[list[str], list[str]]:
    """(words before the colon, words between the colon and the marker) of a prompt."""
    head, sep, rest = normalize(prompt).partition(" : ")
    body = rest.split()
    if not sep or not body or body[-1] != MARKER:
        raise ValueError(f"malformed task prompt {prompt!r}; expected 'TASK [ARGS] : ITEMS {MARKER}'")
    return head.split(), body[:-1]


class Task(ABC):
    """One kind of prompt: how to draw one and how to answer any prompt of its kind.

    `solve` computes a right answer from the prompt text alone (the only one, except for `shuffle`), so
    hand-written prompts can be checked and the generator's answers are not taken on trust.
    """

    name: str

    @abstractmethod
    def draw(self, rng: random.Random) -> str:
        """A random prompt of this task."""

    @abstractmethod
    def solve(self, prompt: str) -> str:
        """A correct answer to a prompt of this task."""

    def answer(self, prompt: str, rng: random.Random) -> str:
        """The answer a training document shows: a draw from the right answers (the one, for most tasks)."""
        return self.solve(prompt)

    def make(self, rng: random.Random) -> TaskExample:
        prompt = self.draw(rng)
        return TaskExample(self.name, prompt, self.answer(prompt, rng))

    def score(self, example: TaskExample, prediction: str) -> bool:
        """Exact match, ignoring how whitespace is laid out around the words."""
        return normalize(prediction) == normalize(example.answer)

    def _args(self, prompt: str, num_args: int) -> tuple[list[str], list[str]]:
        head, items = _parse(prompt)
        if head[0] != self.name or len(head) != 1 + num_args:
            raise ValueError(f"prompt {prompt!r} is not a {self.name!r} prompt with {num_args} argument(s)")
        return head[1:], items


def _names(rng: random.Random) -> list[str]:
    return rng.sample(NAMES, rng.randint(MIN_ITEMS, MAX_ITEMS))


def _index(arg: str, upper: int, prompt: str) -> int:
    if not arg.isdigit() or int(arg) > upper:
        raise ValueError(f"index {arg!r} of prompt {prompt!r} is outside 0..{upper}")
    return int(arg)


class CopyTask(Task):
    name = "copy"

    def draw(self, rng: random.Random) -> str:
        return _render(self.name, _names(rng))

    def solve(self, prompt: str) -> str:
        return " ".join(self._args(prompt, 0)[1])


class ReverseTask(Task):
    name = "reverse"

    def draw(self, rng: random.Random) -> str:
        return _render(self.name, _names(rng))

    def solve(self, prompt: str) -> str:
        return " ".join(reversed(self._args(prompt, 0)[1]))


class SortTask(Task):
    name = "sort"

    def draw(self, rng: random.Random) -> str:
        return _render(self.name, _names(rng))

    def solve(self, prompt: str) -> str:
        return " ".join(sorted(self._args(prompt, 0)[1]))


class InsertTask(Task):
    """Insert a name not yet in the list before position i (i = length appends)."""

    name = "insert"

    def draw(self, rng: random.Random) -> str:
        items = _names(rng)
        new = rng.choice([n for n in NAMES if n not in items])
        return _render(f"{self.name} {rng.randint(0, len(items))} {new}", items)

    def solve(self, prompt: str) -> str:
        (position, new), items = self._args(prompt, 2)
        i = _index(position, len(items), prompt)
        return " ".join(items[:i] + [new] + items[i:])


class RemoveTask(Task):
    name = "remove"

    def draw(self, rng: random.Random) -> str:
        items = _names(rng)
        return _render(f"{self.name} {rng.randrange(len(items))}", items)

    def solve(self, prompt: str) -> str:
        (position,), items = self._args(prompt, 1)
        i = _index(position, len(items) - 1, prompt)
        return " ".join(items[:i] + items[i + 1 :])


class ReplaceTask(Task):
    """Replace item i by a name not in the list, so the answer always differs from a copy."""

    name = "replace"

    def draw(self, rng: random.Random) -> str:
        items = _names(rng)
        new = rng.choice([n for n in NAMES if n not in items])
        return _render(f"{self.name} {rng.randrange(len(items))} {new}", items)

    def solve(self, prompt: str) -> str:
        (position, new), items = self._args(prompt, 2)
        i = _index(position, len(items) - 1, prompt)
        return " ".join(items[:i] + [new] + items[i + 1 :])


class ShuffleTask(CopyTask):
    """Any ordering of the given names (the given one included) is right; documents show uniform draws."""

    name = "shuffle"

    def answer(self, prompt: str, rng: random.Random) -> str:
        items = self._args(prompt, 0)[1]
        return " ".join(rng.sample(items, len(items)))

    def score(self, example: TaskExample, prediction: str) -> bool:
        return sorted(normalize(prediction).split()) == sorted(self._args(example.prompt, 0)[1])


class AddTask(Task):
    """Sum of two three-digit numbers, one token per digit, so a carry ties neighbouring answer tokens."""

    name = "add"

    def draw(self, rng: random.Random) -> str:
        low, high = 10 ** (ADD_DIGITS - 1), 10**ADD_DIGITS - 1
        return add_prompt(rng.randint(low, high), rng.randint(low, high))

    def solve(self, prompt: str) -> str:
        _, body = self._args(prompt, 0)
        if body.count("+") != 1:
            raise ValueError(f"add prompt {prompt!r} needs exactly one '+'")
        plus = body.index("+")
        left, right = "".join(body[:plus]), "".join(body[plus + 1 :])
        if not (left.isdigit() and right.isdigit()):
            raise ValueError(f"add prompt {prompt!r} has a non-digit operand")
        return " ".join(str(int(left) + int(right)))


def add_prompt(a: int, b: int) -> str:
    """The `add` prompt for two non-negative integers of any length."""
    if a < 0 or b < 0:
        raise ValueError(f"add operands must be non-negative, got {a} and {b}")
    return _render("add", [*str(a), "+", *str(b)])


TASKS: dict[str, Task] = {
    task.name: task
    for task in (CopyTask(), ReverseTask(), SortTask(), InsertTask(), RemoveTask(), ReplaceTask(), ShuffleTask(),
                 AddTask())
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}, or 'all'") from None


def is_heldout(prompt: str) -> bool:
    """Stable across processes and machines (unlike `hash`), so the split never depends on a seed."""
    digest = hashlib.blake2b(normalize(prompt).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < HELDOUT_PERCENT


def _task_names(task: str | Sequence[str]) -> list[str]:
    names = list(TASKS) if task == "all" else [task] if isinstance(task, str) else list(task)
    if not names:
        raise ValueError("no task given")
    for name in names:
        get_task(name)
    return names


def make_examples(task: str | Sequence[str], n: int, seed: int, split: Split = "any") -> list[TaskExample]:
    """n examples, reproducible from `seed`; several tasks (or "all") take turns, round-robin.

    `split` keeps only prompts of the training or the held-out split (redrawing the others), so a
    training corpus and evaluation prompts never share a prompt.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', got {split!r}")
    tasks = [TASKS[name] for name in _task_names(task)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        example = tasks[i % len(tasks)].make(rng)
        while split != "any" and is_heldout(example.prompt) != (split == "heldout"):
            example = tasks[i % len(tasks)].make(rng)
        out.append(example)
    return out


def document(example: TaskExample) -> str:
    """One training line: the model learns to continue a prompt with its answer."""
    return f"{example.prompt} {example.answer}"


def score_all(examples: Sequence[TaskExample], predictions: Sequence[str]) -> list[bool]:
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    return [get_task(e.task).score(e, p) for e, p in zip(examples, predictions, strict=True)]


def accuracy(examples: Sequence[TaskExample], predictions: Sequence[str]) -> float:
    scores = score_all(examples, predictions)
    if not scores:
        raise ValueError("accuracy needs at least one example")
    return sum(scores) / len(scores)


def tasks_corpus(num: int | None, seed: int) -> list[str]:
    """Training documents of all tasks mixed, drawn from the training split only."""
    count = DEFAULT_TASK_DOCS if num is None else num
    return [document(e) for e in make_examples("all", count, seed, split="train")]


def write_task_prompts(
    task: str | Sequence[str], path: str | Path, n: int, seed: int = EVAL_SEED, split: Split = "heldout"
) -> list[TaskExample]:
    """Write one prompt per line for generation; the returned examples hold the answers to score against.

    Held-out prompts by default, so accuracy measures the task and not memorised training lines.
    """
    path = check_output_file(path)
    examples = make_examples(task, n, seed, split)
    if not examples:
        raise ValueError("no prompts to write (n=0)")
    atomic_write_text(path, "".join(e.prompt + "\n" for e in examples))
    return examples
