"""Loss, stale KL and gradient norm of a head's training steps, by kind of step, before any scaling.

`train-adjust` trains on three kinds of steps: the K=1 trajectory's order, fixed-K ADJUST's own passes and
`adjust:threshold`'s passes. Adam takes its step size from the gradients it sees; when one kind's gradients are
far larger, the others barely move the head. This prints, for each kind, the mean KL of the head and of the stale
marginals per masked position and the gradient norm over random batches drawn as training draws them (an
untrained head unless --head is given).

    python benchmarks/step_kinds.py --model runs/demo_tasks/tasks/model \\
        --trajectories runs/demo_tasks/tasks/trajectories
"""

from __future__ import annotations

import argparse

import torch

from jointdlm.adjust import train as T
from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
from jointdlm.adjust.trajectories import load_trajectories
from jointdlm.models.mdlm import BuiltinModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--trajectories", required=True)
    parser.add_argument("--head", help="a trained head directory (default: an untrained head, seed 0)")
    parser.add_argument("--subset", type=int, default=500, help="trajectories used (the last ones)")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        base = BuiltinModel.load(args.model)
        data = load_trajectories(args.trajectories)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if 0 < args.subset < len(data):
        _, data = data.split(args.subset)
    rollout = min(T.DEFAULT_ROLLOUT, data.length)
    sampler = T.StateSampler([data], [T.stale_table(base, data, rollout, "cpu")], rollout, 0.5)
    torch.manual_seed(0)
    head = AdjustHead.from_pretrained(args.head, base) if args.head else AdjustHead(AdjustHeadConfig.for_base(base))
    head.requires_grad_(True).train()
    loss_module = T.RolloutLoss(head)
    depth_p = T.depth_probabilities(rollout)
    size = args.batch_size
    print(f"{len(data)} trajectories of {data.length} tokens, {args.batches} batches of {size} per kind")
    means = {}
    for kind in T.KINDS:
        gen = torch.Generator().manual_seed(0)
        rows_out = []
        for _ in range(args.batches):
            depth = min(int(torch.multinomial(depth_p, 1, generator=gen).item()) + 1, max(sampler.depths))
            rows, states, weights = sampler.draw(depth, size, gen)
            threshold, pick = T.step_positions(kind, size, depth, gen)
            batch = T.make_batch(sampler.data, rows, states, depth, base.spec.mask_id, "cpu", weights, threshold, pick)
            loss, stale, _, _, count = loss_module(base, batch)
            head.zero_grad()
            loss.backward()
            grad = torch.sqrt(sum((p.grad ** 2).sum() for p in head.parameters() if p.grad is not None))
            rows_out.append((loss.item(), stale.item(), float(count.sum()), grad.item()))
        t = torch.tensor(rows_out)
        means[kind] = (t[:, 1].mean().item(), t[:, 3].mean().item())
        print(f"{kind:9s} head KL {t[:, 0].mean():.4f}  stale KL {t[:, 1].mean():.4f} (max {t[:, 1].max():.4f})  "
              f"masked positions per batch {t[:, 2].mean():.1f}  gradient norm mean {t[:, 3].mean():.4f} "
              f"median {t[:, 3].median():.4f} max {t[:, 3].max():.4f}")
    k1_stale, k1_grad = means["k1"]
    for kind in ("own", "threshold"):
        print(f"{kind} / k1: stale KL {means[kind][0] / k1_stale:.1f}x, gradient norm {means[kind][1] / k1_grad:.1f}x")


if __name__ == "__main__":
    main()
