"""Validity of K=1 / naive parallel / ADJUST on the template language, with spreads over seeds.

One base model and one trajectory set (cached in --workdir); one ADJUST head per training seed; every
(sampler, K) sampled with several sampling seeds. Prints mean and standard deviation over heads x seeds,
the held-out KL of each head, and time per sequence measured in the same run.

    python benchmarks/template_quality.py --input-form concat --rollout 4 --head-seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from jointdlm.adjust.train import AdjustTrainConfig, final_heldout, train_adjust
from jointdlm.adjust.trajectories import TrajectoryConfig, collect_trajectories
from jointdlm.data import get_language, validity_rate, write_corpus
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.models.train import PretrainConfig, pretrain
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/template-quality")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--trajectories", type=int, default=4000)
    parser.add_argument("--head-steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--input-form", default="concat")
    parser.add_argument("--rollout", type=int, default=4)
    parser.add_argument("--remask-fraction", type=float, default=0.0)
    parser.add_argument("--head-seeds", default="0")
    parser.add_argument("--sample-seeds", default="1,2")
    parser.add_argument("--tokens-per-step", default="2,4,8")
    parser.add_argument("--num", type=int, default=1000)
    args = parser.parse_args()

    work = Path(args.workdir)
    if not (work / "model" / "training_done.json").exists():
        write_corpus("template", work / "corpus.txt", num=20000, seed=0)
        pretrain(work / "corpus.txt", work / "model", PretrainConfig(
            preset="tiny", max_steps=args.pretrain_steps, vocab_size=1024, batch_size=128, eval_every=500))
    base = BuiltinModel.load(work / "model")
    length = base.max_length - 1
    collect_trajectories(base, work / "trajectories", TrajectoryConfig(num=args.trajectories, length=length,
                                                                      batch_size=256, shard_size=1000))
    lang = get_language("template")
    sample_seeds = [int(s) for s in args.sample_seeds.split(",")]
    ks = [int(k) for k in args.tokens_per_step.split(",")]

    def rates(sampler_name: str, k: int, **options) -> tuple[list[float], float]:
        values, seconds = [], 0.0
        for seed in sample_seeds:
            config = SamplingConfig(length=length, tokens_per_step=k, seed=seed, batch_size=500)
            start = time.perf_counter()
            out = generate(base, make_sampler(sampler_name, **options), config, num=args.num)
            seconds += time.perf_counter() - start
            values.append(validity_rate(lang, out.texts))
        return values, 1000 * seconds / (args.num * len(sample_seeds))

    results: dict[tuple[str, int], tuple[list[float], float]] = {("sequential", 1): rates("sequential", 1)}
    for k in ks:
        results[("parallel", k)] = rates("parallel", k)
    heldout = {}
    for head_seed in [int(s) for s in args.head_seeds.split(",")]:
        out = work / (f"adjust-{args.input_form}-r{args.rollout}-lr{args.lr}-s{args.head_steps}"
                      f"{f'-remask{args.remask_fraction}' if args.remask_fraction else ''}-seed{head_seed}")
        head = train_adjust(base, work / "trajectories", out, AdjustTrainConfig(
            max_steps=args.head_steps, lr=args.lr, rollout=args.rollout, input_form=args.input_form, seed=head_seed,
            remask_fraction=args.remask_fraction,
            eval_every=args.head_steps, save_every=args.head_steps))
        heldout[head_seed] = final_heldout(out)
        for k in ks:
            values, ms = rates("adjust", k, head=head)
            print(f"head seed {head_seed} K={k}: validity per sampling seed {values}")
            previous = results.get(("adjust", k), ([], 0.0))
            results[("adjust", k)] = (previous[0] + values, ms if not previous[0] else (previous[1] + ms) / 2)

    k1 = statistics.mean(results[("sequential", 1)][0])
    print(f"\n# template language, {args.num} samples x seeds {sample_seeds}; head: {args.input_form}, "
          f"rollout {args.rollout}, lr {args.lr}, {args.head_steps} steps, seeds {args.head_seeds}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| sampler | K | validity mean | std | n | recovered | ms/seq |")
    print("|---|---|---|---|---|---|---|")
    for (name, k), (values, ms) in results.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        recovered = ""
        if name == "adjust":
            naive = statistics.mean(results[("parallel", k)][0])
            recovered = f"{(mean - naive) / (k1 - naive):.0%}" if k1 > naive else "n/a"
        print(f"| {name} | {k} | {mean:.3f} | {std:.3f} | {len(values)} | {recovered} | {ms:.3f} |")
    for seed, scores in heldout.items():
        print(f"head seed {seed} held-out KL: " + ", ".join(
            f"depth {d}: head {v['head_kl']:.4f} vs stale {v['stale_kl']:.4f}" for d, v in scores.items()))


if __name__ == "__main__":
    main()
