"""How well a built-in model learns the prompted tasks: K=1 exact-match accuracy per task after training.

Trains one base per configuration on the tasks corpus (cached in --workdir) and scores K=1 samples on
held-out prompts, task by task. Used to choose the tasks stage of `jointdlm demo --full`.

    python benchmarks/task_training.py --preset small --steps 3000 --prompt-separator "="
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from jointdlm.data import write_corpus
from jointdlm.data.tasks import TASKS, make_examples
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.models.train import PretrainConfig, pretrain
from jointdlm.sampling.loop import SamplingConfig, encode_prompts, generate
from jointdlm.sampling.registry import make_sampler


def accuracy(model: BuiltinModel, examples: list, lengths: dict[int, int]) -> dict[str, float]:
    """K=1 accuracy (overall and per task) with prompt i given lengths[i] masks."""
    right, total = defaultdict(int), defaultdict(int)
    for length in sorted(set(lengths.values())):
        group = [e for i, e in enumerate(examples) if lengths[i] == length]
        gen = generate(model, make_sampler("sequential"), SamplingConfig(length=length, seed=1, batch_size=350),
                       prompts=[e.prompt for e in group])
        for example, text in zip(group, gen.texts, strict=True):
            right[example.task] += TASKS[example.task].score(example, text)
            total[example.task] += 1
    out = {"all": round(sum(right.values()) / sum(total.values()), 3)}
    return out | {t: round(right[t] / total[t], 2) for t in total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/task-training")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--docs", type=int, default=30000)
    parser.add_argument("--seq-len", type=int, default=24)
    parser.add_argument("--prompt-separator", default=None)
    parser.add_argument("--random-canvas", action="store_true")
    parser.add_argument("--num", type=int, default=350, help="held-out prompts, spread over all tasks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(args.workdir)
    corpus = work / f"corpus-{args.docs}.txt"
    if not corpus.exists():
        write_corpus("tasks", corpus, num=args.docs, seed=0)
    sep = ("sft" if args.prompt_separator else "full") + ("-rc" if args.random_canvas else "")
    name = f"{args.preset}-{args.steps}-b{args.batch_size}-lr{args.lr}-{sep}-d{args.docs}-s{args.seed}"
    model_dir = work / name
    started = time.time()
    if not (model_dir / "training_done.json").exists():
        pretrain(corpus, model_dir, PretrainConfig(
            preset=args.preset, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seq_len=args.seq_len,
            prompt_separator=args.prompt_separator, random_canvas=args.random_canvas,
            eval_every=max(1, args.steps // 6), save_every=args.steps,
            seed=args.seed, device=args.device, progress=False))
    train_s = time.time() - started
    model = BuiltinModel.load(model_dir, device=args.device)
    examples = make_examples("all", args.num, seed=10_000, split="heldout")
    prompts = [e.prompt for e in examples]
    prefixes = encode_prompts(model, prompts)
    shared = accuracy(model, examples, {i: model.max_length - max(map(len, prefixes)) for i in range(len(prompts))})
    full = accuracy(model, examples, {i: model.max_length - len(p) for i, p in enumerate(prefixes)})
    held = [json.loads(line)["heldout_loss"] for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
    print(json.dumps({"config": name, "device": args.device, "train_s": round(train_s, 1),
                      "heldout_loss": round(held[-1], 4), "k1_shared_canvas": shared, "k1_full_canvas": full,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
