"""Every sampler at several settings on one dataset: quality vs base passes per sample (issue #14).

Runs one `jointdlm eval` grid (K=1, naive parallel and ADJUST at fixed K, adaptive ADJUST, the confidence
threshold, EB and PUNT at several settings), writes results.json / results.md / pareto.png into --out, then
prints, for each budget of base passes per sample, the best training-free row and the best ADJUST row with
their 95% intervals, and every training-free row that no adaptive ADJUST row matches at equal or lower cost
(base passes, and wall time in the same run: each row's median of --timing-repeats runs, in rounds over the
grid). Quality is exact validity (--language), task accuracy (--task) or the causal scorer's NLL of the samples
(--scorer, lower is better; then the same by MAUVE against K=1's samples, which an NLL below K=1's by less varied
text does not fool).

    python benchmarks/pareto.py --model runs/recipe/choice/model --adjust runs/recipe/choice/heads/final-seed0 \
        --language choice --out runs/pareto/choice
    python benchmarks/pareto.py --model runs/demo/english/model --adjust runs/demo/english/adjust \
        --scorer runs/demo/english/scorer --num 200 --out runs/pareto/english
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from jointdlm.adjust.head import AdjustHead
from jointdlm.eval.runner import EvalConfig, run_eval
from jointdlm.models.causal import CausalScorer
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.sampling.adjust import AdjustConfig
from jointdlm.sampling.base import TokenChoice
from jointdlm.sampling.registry import parse_spec

SAMPLERS = ("parallel", "adjust", "adjust:tau=0.9",
            "adjust:gamma=1", "adjust:gamma=4", "adjust:gamma=16", "adjust:gamma=64",
            "adjust:threshold=0.9", "adjust:threshold=0.7", "adjust:threshold=0.5",
            "adjust:threshold=0.9:tau=0.3", "adjust:threshold=0.5:tau=0.5", "adjust:threshold=0.3:tau=0.3",
            "adjust:threshold=0.1:tau=0.1",
            "threshold:tau=0.9", "threshold:tau=0.7", "threshold:tau=0.5", "threshold:tau=0.3", "threshold:tau=0.1",
            "threshold:tau=0.9:extra=1", "threshold:tau=0.7:extra=1", "threshold:tau=0.5:extra=1",
            "eb:gamma=1", "eb:gamma=2", "eb:gamma=4", "eb:gamma=8", "eb:gamma=16",
            "punt:epsilon=0.5", "punt:epsilon=2")
TOKENS_PER_STEP = (1, 2, 4, 6, 8, 16)


def best_within(rows: list[dict], budget: float, adjust: bool, metric: str = "validity") -> dict | None:
    """The best row by `metric` (NLL: lowest) among those with at most `budget` base passes per sample."""
    pool = [r for r in rows if r["speed"]["base_passes_per_sample"] <= budget
            and r["sampler"].startswith("adjust") == adjust and r["sampler"] != "sequential"]
    return best_of(pool, metric)


def best_of(pool: list[dict], metric: str) -> dict | None:
    """The row of `pool` best by `metric` (NLL: lowest), None if empty."""
    return max(pool, key=lambda r: _signed(r, metric), default=None)


def _signed(row: dict, metric: str) -> float:
    """The row's quality with higher = better."""
    value = row["quality"][metric]["value"]
    return -value if metric == "nll" else value


def is_adaptive_adjust(spec: str) -> bool:
    """An ADJUST spec whose steps stop on a test (tau, gamma or a threshold round), as the sampler decides it."""
    name, options = parse_spec(spec)
    return name == "adjust" and AdjustConfig(**options).adaptive


COSTS = {"passes": lambda r: r["speed"]["base_passes_per_sample"],
         "wall time": lambda r: r["speed"]["wall_time_s"] / max(1, r["speed"]["samples"])}


def unmatched(rows: list[dict], metric: str, cost: str) -> list[tuple[dict, dict | None]]:
    """Issue #14's check, on point estimates: each training-free row that no adaptive ADJUST row (a tau, gamma or
    threshold test) matches at equal or lower cost with equal or better quality, with the best adaptive row
    within that cost (None if there is none). A row at zero validity or accuracy has nothing to match: every
    sampler, or none, is that good."""
    cost_of = COSTS[cost]
    adaptive = [r for r in rows if is_adaptive_adjust(r["sampler"])]
    out = []
    for row in rows:
        if row["sampler"].startswith("adjust") or row["sampler"] == "sequential":
            continue
        if metric != "nll" and row["quality"][metric]["value"] <= 0:
            continue
        best = best_of([a for a in adaptive if cost_of(a) <= cost_of(row) * (1 + 1e-9)], metric)
        if best is None or _signed(best, metric) < _signed(row, metric):
            out.append((row, best))
    return out


def overlaps(a: dict, b: dict, metric: str) -> bool:
    """Whether the two rows' 95% intervals of `metric` overlap."""
    x, y = a["quality"][metric], b["quality"][metric]
    return x["low"] <= y["high"] and y["low"] <= x["high"]


def describe(row: dict | None, metric: str = "validity") -> str:
    if row is None:
        return "–"
    v = row["quality"][metric]
    k = f" K={row['tokens_per_step']}" if row["tokens_per_step"] else ""
    # What the metric cannot see beside it: a low NLL by repetition shows in the entropy (and MAUVE), a high
    # validity by writing the likeliest strings too often in the total variation to the language's distribution.
    beside = {"nll": ("entropy", "mauve"), "mauve": ("nll", "entropy"), "validity": ("tv_distance",)}.get(metric, ())
    shown = [f"{name.replace('_distance', '')} {row['quality'][name]['value']:.2f}" for name in beside
             if name in row["quality"]]
    return (f"{row['sampler']}{k}: {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
            + (f" ({', '.join(shown)})" if shown else "")
            + f" at {row['speed']['base_passes_per_sample']:.1f} base passes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adjust", required=True, help="ADJUST head directory")
    quality = parser.add_mutually_exclusive_group(required=True)
    quality.add_argument("--language", help="toy language: exact validity")
    quality.add_argument("--task", help="prompted task (e.g. shuffle): accuracy")
    quality.add_argument("--scorer", help="causal scorer directory: NLL (and MAUVE) of the samples")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", default="3,4,5,6,8")
    parser.add_argument("--tokens-per-step", default=",".join(map(str, TOKENS_PER_STEP)),
                        help="K of every sampler that fills K per step (and the cap of adaptive ADJUST)")
    parser.add_argument("--more-samplers", default="",
                        help="comma-separated specs sampled besides the script's own (e.g. adjust:candidates=4)")
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="wall time of each row: the median of this many runs (same samples), in rounds that "
                             "run every row once")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus cut shared by every row, K=1 included: a refusal rule (the threshold's, "
                             "adjust:tau) cuts unlikely draws too, so an NLL or validity compared with K=1's "
                             "says more at a shared cut")
    args = parser.parse_args()
    if args.timing_repeats < 1:
        parser.error(f"--timing-repeats must be >= 1, got {args.timing_repeats}")
    torch.set_num_threads(args.threads)

    try:
        tokens_per_step = tuple(int(k) for k in args.tokens_per_step.split(","))
    except ValueError:
        parser.error(f"--tokens-per-step must be comma-separated integers, got {args.tokens_per_step!r}")
    samplers = SAMPLERS + tuple(s for s in args.more_samplers.split(",") if s)
    try:
        cfg = EvalConfig(samplers=samplers, tokens_per_step=tokens_per_step, num=args.num, seed=args.seed,
                         language=args.language, task=args.task, batch_size=500, timing_repeats=args.timing_repeats,
                         choice=TokenChoice(top_p=args.top_p))
    except ValueError as err:
        parser.error(str(err))
    metric = "validity" if args.language else "accuracy" if args.task else "nll"
    try:  # run_eval builds every sampler before it samples or writes anything: a bad spec is one line here
        model = BuiltinModel.load(args.model)
        head = AdjustHead.from_pretrained(args.adjust, model)
        scorer = CausalScorer.load(args.scorer) if args.scorer else None
        with torch.no_grad():
            results = run_eval(model, cfg, args.out, adjust_head=head, scorer=scorer,
                               command="python " + shlex.join(sys.argv))
    except (ValueError, OSError) as err:
        parser.error(str(err))

    rows = results["rows"]
    # An NLL rewards text less varied than K=1's (a sampler that writes its likeliest tokens too often scores below
    # K=1's NLL); MAUVE, which compares the samples' distribution with K=1's, does not: with a scorer both are checked.
    for name in (metric, "mauve") if metric == "nll" else (metric,):
        report(rows, name, args.budgets, args.language or args.task or args.model)


def report(rows: list[dict], metric: str, budgets: str, dataset: str) -> None:
    """The best rows within each budget of base passes, and issue #14's check in each cost, by `metric`."""
    k1 = next(r for r in rows if r["sampler"] == "sequential")
    print(f"\n{dataset} ({metric}): K=1 {describe(k1, metric)}")
    print("| base passes per sample ≤ | best training-free | best ADJUST |")
    print("|---|---|---|")
    for budget in (float(b) for b in budgets.split(",")):
        print(f"| {budget:g} | {describe(best_within(rows, budget, False, metric), metric)} | "
              f"{describe(best_within(rows, budget, True, metric), metric)} |")
    for cost in COSTS:
        missed = unmatched(rows, metric, cost)
        print(f"\nAdaptive ADJUST vs every training-free row by {metric}, in {cost} (point estimates): "
              + ("each is matched or beaten." if not missed else f"{len(missed)} not matched:"))
        for row, best in missed:
            verdict = "" if best is None else ("; level within the 95% intervals" if overlaps(row, best, metric)
                                               else "; worse, outside the intervals")
            print(f"- {describe(row, metric)}; best adaptive ADJUST within its {cost}: "
                  f"{describe(best, metric)}{verdict}")


if __name__ == "__main__":
    main()
