"""Does held-out KL rank ADJUST heads by how well they sample? (results §2, "moving average")

For each head, the held-out KL that training scores (the run's own last 64 K=1 trajectories, 256 states per depth)
and the same on a larger collection the head never saw (--trajectories, 4,096 states per depth in the K=1 order
and 1,024 on the passes of `adjust:threshold=0.9`), with the head/stale ratio that training's plateau rule
reads. With --validity (one sampled quality figure per head, same order), the Spearman rank correlation of each
column with it (lower KL should mean higher validity).

    jointdlm trajectories --model runs/demo/template/model --out runs/heldsig/traj --num 1024 --seed 77
    python benchmarks/heldout_signal.py --model runs/demo/template/model --trajectories runs/heldsig/traj \\
        --own runs/demo/template/trajectories --heads runs/ema/tpl_s0,runs/ema/tpl_s1 --validity 0.929,0.955
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch
from scipy.stats import ConstantInputWarning, spearmanr

from jointdlm.adjust.head import AdjustHead
from jointdlm.adjust.train import HELDOUT_THRESHOLD, RolloutLoss, StateSampler, evaluate, example_table
from jointdlm.adjust.trajectories import load_trajectories
from jointdlm.models.mdlm import BuiltinModel

ROLLOUT = 8


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); 0 where a column is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        rho = float(spearmanr(x, y).statistic)
    return 0.0 if math.isnan(rho) else rho


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--trajectories", required=True, help="K=1 trajectories no head trained on")
    parser.add_argument("--own", required=True, help="the trajectories the heads trained on (last 64 held out)")
    parser.add_argument("--heads", required=True, help="comma-separated head directories")
    parser.add_argument("--validity", default=None, help="comma-separated sampled quality, one per head")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads = args.heads.split(",")
    validity = [float(v) for v in args.validity.split(",")] if args.validity else None
    if validity is not None and len(validity) != len(heads):
        sys.exit(f"heldout_signal: error: {len(heads)} heads but {len(validity)} validity figures")

    base = BuiltinModel.load(args.model)
    _, held = load_trajectories(args.own).split(64)
    fresh = load_trajectories(args.trajectories)
    sets = [("own 64", held, 256, 256), ("fresh", fresh, 4096, 1024)]
    columns: dict[str, list[float]] = {}
    for path in heads:
        loss = RolloutLoss(AdjustHead.from_pretrained(path, base))
        with torch.no_grad():
            for name, data, k1_states, thr_states in sets:
                sampler = StateSampler([data], [example_table(data, ROLLOUT)], ROLLOUT, 0.0)
                for kind, threshold, n in [("K=1 order", None, k1_states),
                                           ("threshold passes", HELDOUT_THRESHOLD, thr_states)]:
                    scores = evaluate(loss, base, sampler, "cpu", examples=n, threshold=threshold)
                    head = sum(v["head_kl"] for v in scores.values()) / len(scores)
                    ratio = sum(v["head_kl"] / v["stale_kl"] for v in scores.values()) / len(scores)
                    columns.setdefault(f"{name}, {kind}: head KL (1e-3 nats)", []).append(1000 * head)
                    columns.setdefault(f"{name}, {kind}: head/stale", []).append(ratio)
        print(f"scored {path}", file=sys.stderr)
    print("| head | " + " | ".join(columns) + (" | validity |" if validity else " |"))
    print("|---" * (len(columns) + 1 + bool(validity)) + "|")
    for i, path in enumerate(heads):
        cells = [f"{c[i]:.4f}" for c in columns.values()] + ([f"{validity[i]:.3f}"] if validity else [])
        print(f"| {path} | " + " | ".join(cells) + " |")
    if validity:
        print("| Spearman with validity (negated KL) | "
              + " | ".join(f"{spearman([-v for v in c], validity):.2f}" for c in columns.values()) + " | |")


if __name__ == "__main__":
    main()
