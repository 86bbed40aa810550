"""The ADJUST training recipe measured on toy languages with exact validity, across head seeds.

For each language: a `small` base of 2,000 steps (the CLI's pre-training defaults when these runs were recorded;
`--pretrain-steps 6000` for today's), 4,000 K=1 trajectories with the CLI's
defaults, then one head per seed with `AdjustTrainConfig` defaults (or the overrides given with --set), and
validity of K=1, naive parallel and ADJUST at K=4 and K=8 (500 samples, sampling seed 1). Everything is cached
under --workdir, so a second variant reuses the base and trajectories.

    python benchmarks/adjust_recipe.py --language choice --head-seeds 0,1,2
    python benchmarks/adjust_recipe.py --language permutation --head-seeds 0,1,2 --set onpolicy_rounds=0 --tag k1only
    python benchmarks/adjust_recipe.py --language template --workdir runs/recipe-tiny --preset tiny \
        --pretrain-steps 1500 --pretrain-batch 128 --head-seeds 0,1,2,3,4      # the test suite's template base
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import fields
from pathlib import Path

import torch

from jointdlm.adjust.train import AdjustTrainConfig, read_verdict, train_adjust
from jointdlm.adjust.trajectories import TrajectoryConfig, collect_trajectories
from jointdlm.data import get_language, validity_rate, write_corpus
from jointdlm.models.mdlm import BuiltinModel, read_config
from jointdlm.models.train import PretrainConfig, pretrain
from jointdlm.sampling.loop import SamplingConfig, fill_length, generate
from jointdlm.sampling.registry import make_from_spec, make_sampler


def parse_overrides(items: list[str], config: type = AdjustTrainConfig) -> dict:
    """key=value items as `config`'s fields, each converted to its field's type."""
    types = {f.name: f.type for f in fields(config)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown {config.__name__} field {key!r}")
        kind = str(types[key])
        if "bool" in kind:
            out[key] = value.lower() in ("1", "true", "yes")
        elif "int" in kind:
            out[key] = int(value)
        elif "float" in kind:
            out[key] = float(value)
        else:
            out[key] = value
    return out


def validity(base: BuiltinModel, language: str, sampler, k: int, num: int, seed: int, length: int) -> float:
    config = SamplingConfig(length=length, tokens_per_step=k, seed=seed, batch_size=500)
    with torch.no_grad():
        texts = generate(base, sampler, config, num=num).texts
    return validity_rate(get_language(language), texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language", required=True)
    parser.add_argument("--workdir", default="runs/recipe")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--pretrain-batch", type=int, default=64)
    parser.add_argument("--trajectories", type=int, default=4000)
    parser.add_argument("--head-seeds", default="0,1,2",
                        help="comma-separated; empty (--head-seeds '') stops after the base, trajectories and "
                             "reference rows, e.g. to prepare a base of convergence_study.py copied into --workdir")
    parser.add_argument("--set", nargs="+", action="extend", default=[],
                        help="AdjustTrainConfig overrides, key=value (repeatable)")
    parser.add_argument("--tag", default="default")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--sample-seed", type=int, default=1)
    parser.add_argument("--tokens-per-step", default="4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="also measure adjust:threshold=T at each K (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(args.workdir) / args.language
    if (work / "model" / "config.json").exists():  # a cached base must be the one these flags ask for
        saved = read_config(work / "model" / "config.json").get("pretrain") or {}
        wanted = {"preset": args.preset, "max_steps": args.pretrain_steps, "batch_size": args.pretrain_batch}
        differ = [f"{key}={saved[key]!r} there, {value!r} now" for key, value in wanted.items()
                  if key in saved and saved[key] != value]
        if differ:
            parser.error(f"{work / 'model'} was pre-trained otherwise ({'; '.join(differ)}): its results would be "
                         "labelled with these flags; use another --workdir")
    if not (work / "model" / "training_done.json").exists():
        write_corpus(args.language, work / "corpus.txt", num=20000, seed=0)
        pretrain(work / "corpus.txt", work / "model", PretrainConfig(preset=args.preset, max_steps=args.pretrain_steps,
                                                                     batch_size=args.pretrain_batch))
    base = BuiltinModel.load(work / "model")
    length = fill_length(base, None)
    started = time.time()
    collect_trajectories(base, work / "trajectories", TrajectoryConfig(num=args.trajectories, length=length,
                                                                        batch_size=256, progress=False))
    print(f"trajectories ready ({time.time() - started:.0f} s)", flush=True)
    ks = [int(k) for k in args.tokens_per_step.split(",")]
    reference_path = work / f"reference-seed{args.sample_seed}-n{args.num}.json"
    reference = json.loads(reference_path.read_text()) if reference_path.exists() else {}
    if "k1" not in reference:
        reference["k1"] = validity(base, args.language, make_sampler("sequential"), 1, args.num, args.sample_seed,
                                   length)
    for k in sorted({2, 3, 4, 8} | set(ks)):  # naive parallel at every K asked for (cached runs may lack some)
        if f"naive{k}" not in reference:
            reference[f"naive{k}"] = validity(base, args.language, make_sampler("parallel"), k, args.num,
                                              args.sample_seed, length)
    reference_path.write_text(json.dumps(reference))
    print(f"{args.language}: reference {reference}", flush=True)
    overrides = parse_overrides(args.set)
    rows = []
    for seed in [int(s) for s in args.head_seeds.split(",") if s.strip()]:
        out = work / "heads" / f"{args.tag}-seed{seed}"
        cfg = AdjustTrainConfig(seed=seed, progress=False, **overrides)
        t0 = time.time()
        head = train_adjust(base, work / "trajectories", out, cfg)
        train_s = time.time() - t0
        row = {"language": args.language, "tag": args.tag, "overrides": overrides, "seed": seed,
               "train_s": round(train_s, 1), "verdict": read_verdict(out)}
        for k in ks:
            v = validity(base, args.language, make_sampler("adjust", head=head), k, args.num, args.sample_seed,
                         length)
            naive, k1 = reference[f"naive{k}"], reference["k1"]
            row[f"adjust{k}"] = v
            row[f"recovered{k}"] = (v - naive) / (k1 - naive) if k1 > naive else float("nan")
            if args.threshold:
                row[f"threshold{k}"] = validity(base, args.language, make_from_spec(
                    f"adjust:threshold={args.threshold}", head=head), k, args.num, args.sample_seed, length)
        rows.append(row)
        ratios = row["verdict"]["ratios"] if row["verdict"] else {}
        print(json.dumps({k: v for k, v in row.items() if k != "verdict"} | {"ratios": ratios,
                                                                          "steps": row["verdict"]["steps"]}),
              flush=True)
        with open(Path(args.workdir) / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    if not rows:  # --head-seeds '': the base, trajectories and reference rows only
        return
    for k in ks:
        rec = [r[f"recovered{k}"] for r in rows]
        values = ", ".join(f"{r['adjust' + str(k)]:.3f}" for r in rows)
        print(f"{args.language} {args.tag} K={k}: ADJUST validity {values}; "
              f"recovered {', '.join(f'{x:.0%}' for x in rec)}"
              f" (mean {statistics.mean(rec):.0%}, min {min(rec):.0%}); naive {reference[f'naive{k}']:.3f}, "
              f"K=1 {reference['k1']:.3f}")
        if args.threshold:
            values = ", ".join(f"{r['threshold' + str(k)]:.3f}" for r in rows)
            print(f"{args.language} {args.tag} K={k}: adjust:threshold={args.threshold} validity {values}")


if __name__ == "__main__":
    main()
