"""Training's held-out evaluation and stale-KL sweep, split between processes: wall time shared vs alone.

Under torchrun each process times the work split between the processes (its share of the batches, then the
exchange) and the same work done alone, which is what every process did before the split (results §9). Both give
the same numbers; the script checks that too. One thread per process, so run it with as many processes as the
machine has cores and nothing else running:

    python benchmarks/split_work.py --model runs/demo/template/model --trajectories runs/demo/template/trajectories \\
        --adjust runs/tpl6k/s0 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator

    from jointdlm.adjust.head import AdjustHead
    from jointdlm.adjust.train import (
        HELDOUT_THRESHOLD,
        RolloutLoss,
        StateSampler,
        evaluate,
        example_table,
        stale_table,
    )
    from jointdlm.adjust.trajectories import load_trajectories
    from jointdlm.models.mdlm import BuiltinModel

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    base = BuiltinModel.load(args.model)
    head = AdjustHead.from_pretrained(args.adjust, base)
    data = load_trajectories(args.trajectories)
    train, held = data.split(64)
    sweep = train.split(len(train) - args.sweep_rows)[0] if args.sweep_rows < len(train) else train
    rollout = min(8, data.length)
    sampler = StateSampler([held], [example_table(held, rollout)], rollout, 0.0)
    loss = RolloutLoss(head)
    work = {
        "evaluation, K=1 order": lambda acc: evaluate(loss, base, sampler, "cpu", 256, accelerator=acc),
        "evaluation, adjust:threshold passes": lambda acc: evaluate(loss, base, sampler, "cpu", 256,
                                                                    threshold=HELDOUT_THRESHOLD, accelerator=acc),
        f"stale-KL sweep, {len(sweep)} trajectories": lambda acc: stale_table(base, sweep, rollout, "cpu",
                                                                               accelerator=acc),
    }
    rows = []
    for name, run in work.items():
        times: dict[str, list[float]] = {"alone": [], "shared": []}
        results = {}
        for _ in range(args.repeats):  # alternating, median: the first call of a kind pays for warming up
            for mode, acc in (("alone", None), ("shared", accelerator)):
                accelerator.wait_for_everyone()
                start = time.perf_counter()
                results[mode] = run(acc)
                times[mode].append(time.perf_counter() - start)
        times = {mode: statistics.median(t) for mode, t in times.items()}
        a, b = results["alone"], results["shared"]
        same = a == b if isinstance(a, dict) else bool(torch.equal(a.isnan(), b.isnan())
                                                       and torch.equal(a.nan_to_num(), b.nan_to_num()))
        rows.append({"work": name, "alone_s": times["alone"], "shared_s": times["shared"], "same": same})
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--trajectories", required=True)
    parser.add_argument("--adjust", required=True)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--sweep-rows", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timings per mode (the median is reported)")
    parser.add_argument("--out", default="split_work.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [str(torchrun), "--standalone", "--nproc_per_node", str(args.processes), __file__, "--worker",
            "--model", args.model, "--trajectories", args.trajectories, "--adjust", args.adjust,
            "--sweep-rows", str(args.sweep_rows), "--repeats", str(args.repeats), "--out", args.out]
    subprocess.run(argv, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(Path(args.out).read_text())
    print(f"{args.processes} processes, one thread each, median of {args.repeats}; `{' '.join(sys.argv)}`\n")
    print("| work | alone (s) | split (s) | alone / split | same numbers |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['work']} | {r['alone_s']:.2f} | {r['shared_s']:.2f} | {r['alone_s'] / r['shared_s']:.2f}x | "
              f"{'yes' if r['same'] else 'NO'} |")


if __name__ == "__main__":
    main()
