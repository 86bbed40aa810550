"""Data and scoring of jointdlm's list and arithmetic tasks (jointdlm.data.tasks) as lm-eval tasks.

The prompts are the held-out split that `jointdlm eval --task` uses (seed 10,000 + `jointdlm_seed`), so the
two evaluations see the same prompts; `shuffle` accepts any ordering of the names, as the task itself does.
"""

from __future__ import annotations

from jointdlm.data.tasks import TaskExample, get_task, make_examples


def dataset(jointdlm_task: str = "all", jointdlm_num: int = 500, jointdlm_seed: int = 0, **_metadata):
    import datasets

    examples = make_examples(jointdlm_task, int(jointdlm_num), seed=10_000 + int(jointdlm_seed), split="heldout")
    rows = [{"task": e.task, "prompt": e.prompt, "answer": e.answer} for e in examples]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    example = TaskExample(doc["task"], doc["prompt"], doc["answer"])
    return {"exact_match": float(get_task(doc["task"]).score(example, results[0]))}
