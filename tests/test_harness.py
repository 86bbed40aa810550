"""jointdlm inside lm-evaluation-harness, offline: local YAML tasks over JSONL files written here, run through
`jointdlm lm-eval` with the choice-language base (which has learned the language, so K=1 is near perfect)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from jointdlm.cli import main  # noqa: E402
from jointdlm.data.toy import CHOICE_JOBS, ChoiceLanguage, normalize  # noqa: E402
from jointdlm.eval.harness import register, write_gsm8k_task  # noqa: E402

UTILS = '''
from jointdlm.data import get_language, normalize


def process_results(doc, results):
    return {"valid": float(get_language("choice").is_valid(normalize(doc["prompt"] + " " + results[0])))}
'''


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Two local tasks: continue a choice sentence from its first word, the name (generate_until, scored by exact
    validity: the job is still open, and it fixes five later words that parallel decoding fills independently),
    and pick the job's place over another job's (multiple choice, by loglikelihood)."""
    root = tmp_path_factory.mktemp("harness_tasks")
    lang = ChoiceLanguage()
    sentences = lang.sample(40, seed=5)
    with open(root / "continue.jsonl", "w") as f:
        for s in sentences:
            f.write(json.dumps({"prompt": s.split()[0]}) + "\n")
    with open(root / "place.jsonl", "w") as f:
        for name in range(6):
            for job in range(len(CHOICE_JOBS)):
                words = lang.render([name, job, 0, 0, 0, 0]).split()
                cut = words.index("in") + 2
                other = CHOICE_JOBS[(job + 3) % len(CHOICE_JOBS)][-1]
                f.write(json.dumps({"context": " ".join(words[:cut]), "choices": [f" {words[cut]}", f" {other}"],
                                    "gold": 0}) + "\n")
    (root / "utils.py").write_text(UTILS)
    (root / "choice_continue.yaml").write_text(f"""task: choice_continue
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'continue.jsonl'}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{prompt}}}}"
process_results: !function utils.process_results
metric_list:
  - metric: valid
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 24
""")
    (root / "choice_place.yaml").write_text(f"""task: choice_place
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'place.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    return root


def run_harness(tasks_dir: Path, out: Path, model_args: str, task: str, capsys) -> tuple[dict, str]:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    code = main(["lm-eval", "run", "--model", "jointdlm", "--model_args", model_args, "--tasks", task,
                 "--include_path", str(tasks_dir), "--output_path", str(out), "--batch_size", "40"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results written under {out}"
    return json.loads(files[-1].read_text())["results"][task], err


def test_generate_until_with_k1_naive_and_adjust(choice_model, choice_workdir, tasks_dir, tmp_path, capsys):
    model = choice_workdir / "model"
    k1, err = run_harness(tasks_dir, tmp_path / "k1", f"pretrained={model},sampler=sequential,temperature=1",
                          "choice_continue", capsys)
    assert k1["valid,none"] >= 0.9, k1
    assert "jointdlm lm-eval [sequential, K=1]: 40 generations" in err and "tokens/s" in err
    naive, _ = run_harness(tasks_dir, tmp_path / "naive",
                           f"pretrained={model},sampler=parallel,tokens_per_step=4,temperature=1",
                           "choice_continue", capsys)
    assert naive["valid,none"] <= k1["valid,none"] - 0.3, (naive, k1)
    # An (untrained) head through the same path: ADJUST runs with every option lm-eval passes on.
    from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
    from jointdlm.models.mdlm import BuiltinModel

    base = BuiltinModel.load(model)
    AdjustHead(AdjustHeadConfig.for_base(base)).save_pretrained(tmp_path / "head")
    adjust, err = run_harness(tasks_dir, tmp_path / "adjust",
                              f"pretrained={model},sampler=adjust:tau=0.9,adjust={tmp_path / 'head'},"
                              "tokens_per_step=4,temperature=1", "choice_continue", capsys)
    assert "jointdlm lm-eval [adjust:tau=0.9, K=4]" in err and 0.0 <= adjust["valid,none"] <= 1.0


def test_loglikelihood_picks_the_jobs_place(choice_model, choice_workdir, tasks_dir, tmp_path, capsys):
    result, _ = run_harness(tasks_dir, tmp_path / "mc", f"pretrained={choice_workdir / 'model'},mc_samples=8",
                            "choice_place", capsys)
    assert result["acc,none"] >= 0.85, result


def test_bad_model_args_are_one_line(choice_workdir, tasks_dir, tmp_path, capsys):
    code = main(["lm-eval", "run", "--model", "jointdlm", "--model_args",
                 f"pretrained={choice_workdir / 'model'},sampler=bogus", "--tasks", "choice_continue",
                 "--include_path", str(tasks_dir)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jointdlm: error")]
    assert code == 2 and len(lines) == 1 and "unknown sampler" in lines[0]


def evaluate_canned(complete, tasks: list[str], include_path: Path, **options) -> dict:
    """lm-eval's own evaluation of local tasks with a model whose completion of each prompt is `complete(prompt)`
    (the scoring is under test, not the model)."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class Canned(LM):
        def generate_until(self, requests):
            return [complete(r.args[0]) for r in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    register()
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    return simple_evaluate(model=Canned(), tasks=tasks, task_manager=manager, **options)


GSM8K_DOCS = [
    {"question": "q1", "answer": "She has 3 + 4 = 7.\n#### 7"},
    {"question": "q2", "answer": "Total 1,200 dollars.\n#### 1200"},
    {"question": "q3", "answer": "It is -5.\n#### -5"},
    {"question": "q4", "answer": "#### 42"},
]
# (completion, strict-match correct, flexible-extract correct), checked by hand against lm-eval's gsm8k filters:
# strict takes "#### N"; flexible takes the last number-like match; both drop "," "$" and a final ".".
COMPLETIONS = [
    ("3 + 4 = 7 so\n#### 7", 1, 1),
    ("The total is $1,200.", 0, 1),
    ("First -5, then 8", 0, 0),
    ("#### 42\nor maybe 41", 1, 0),
]


def test_gsm8k_task_scores_like_lm_evals_gsm8k(tmp_path):

    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in GSM8K_DOCS))
    write_gsm8k_task(data, tmp_path / "tasks")
    answers = {f"Question: {d['question']}\nAnswer:": c for d, (c, _, _) in zip(GSM8K_DOCS, COMPLETIONS, strict=True)}

    out = evaluate_canned(lambda prompt: answers[prompt], ["gsm8k_local"], tmp_path / "tasks")
    scores = out["results"]["gsm8k_local"]
    assert scores["exact_match,strict-match"] == pytest.approx(sum(c[1] for c in COMPLETIONS) / 4)
    assert scores["exact_match,flexible-extract"] == pytest.approx(sum(c[2] for c in COMPLETIONS) / 4)
    assert normalize(" a  b ") == "a b"


def test_jointdlm_tasks_ship_with_the_package_and_score_like_the_tasks(tiny_model_dir, tmp_path, capsys):
    """The list and arithmetic tasks as lm-eval tasks: a model answering with each task's own solver scores 1
    (shuffle accepts any ordering, not just the generator's), a wrong answer 0; `jointdlm lm-eval` finds them
    without --include_path."""

    from jointdlm.data.tasks import get_task
    from jointdlm.eval.harness import TASKS_DIR

    def solve(prompt: str) -> str:
        name = prompt.split()[0]
        answer = get_task(name).solve(prompt)
        return " ".join(reversed(answer.split())) if name == "shuffle" else "wrong" if name == "add" else answer

    out = evaluate_canned(solve, ["jointdlm_tasks"], TASKS_DIR, limit=20)
    scores = {name: r["exact_match,none"] for name, r in out["results"].items() if name.startswith("jointdlm_")
              and name != "jointdlm_tasks"}
    assert len(scores) == 8
    assert scores.pop("jointdlm_add") == 0.0 and all(v == 1.0 for v in scores.values()), scores

    code = main(["lm-eval", "run", "--model", "jointdlm", "--model_args", f"pretrained={tiny_model_dir}",
                 "--tasks", "jointdlm_copy", "--limit", "4", "--output_path", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "jointdlm lm-eval [sequential, K=1]: 4 generations" in capsys.readouterr().err


def test_builtin_task_index_is_skipped_only_when_every_task_is_local(tasks_dir):
    """lm-eval's ~15k built-in tasks take seconds to index: `jointdlm lm-eval` skips them only when every
    requested task is a plain name found in jointdlm's or the user's task directories."""
    from lm_eval.tasks import TaskManager

    from jointdlm.eval.harness import TASKS_DIR, only_local_tasks

    paths = [str(TASKS_DIR), str(tasks_dir)]
    assert only_local_tasks(["jointdlm_copy", "choice_place"], paths, TaskManager)
    assert not only_local_tasks(["jointdlm_copy", "gsm8k"], paths, TaskManager)
    assert not only_local_tasks(["jointdlm_*"], paths, TaskManager)
    assert not only_local_tasks([str(tasks_dir / "choice_place.yaml")], paths, TaskManager)
    assert not only_local_tasks([], paths, TaskManager)
