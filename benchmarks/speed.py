"""Time per sequence of K=1, naive parallel and ADJUST, measured side by side in one process.

Usage: python benchmarks/speed.py [--model DIR --adjust DIR] [--num N] [--batch-size B] [--repeats R]
Defaults to the template-language model and head that `make demo` builds under runs/demo/template.
Prints, per sampler and K: base passes, head passes, ms per sequence (best of R), and ratios to K=1 and to
naive parallel at the same K.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from jointdlm.adjust.head import AdjustHead
from jointdlm.models.loading import load_model
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_sampler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/template/model")
    parser.add_argument("--adjust", default="runs/demo/template/adjust")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens-per-step", default="2,4,8")
    args = parser.parse_args()
    try:
        model = load_model(args.model)
        head = AdjustHead.from_pretrained(args.adjust, model)
    except (FileNotFoundError, ValueError) as err:
        print(f"speed: error: {err} (run `make demo` first, or pass --model and --adjust)", file=sys.stderr)
        return 2
    length = model.max_length - 1
    runs = [("sequential", 1)] + [(name, int(k)) for k in args.tokens_per_step.split(",")
                                   for name in ("parallel", "adjust")]
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.num} sequences x {length} tokens, batch {args.batch_size}, best of {args.repeats}")
    timings = {}
    for name, k in runs:
        sampler = make_sampler(name, head=head) if name == "adjust" else make_sampler(name)
        config = SamplingConfig(length=length, tokens_per_step=k, batch_size=args.batch_size)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = generate(model, sampler, config, num=args.num)
            best = min(best, time.perf_counter() - start)
        timings[(name, k)] = (best, out.counters)
    k1 = timings[("sequential", 1)][0]
    print("| sampler | K | base passes | head passes | ms/seq | time vs K=1 | time vs naive same K |")
    print("|---|---|---|---|---|---|---|")
    for (name, k), (seconds, c) in timings.items():
        naive = timings.get(("parallel", k), (seconds, None))[0]
        print(f"| {name} | {k} | {c.base_passes:.1f} | {c.extra_passes:.1f} | {1000 * seconds / args.num:.3f} "
              f"| {seconds / k1:.2f}x | {seconds / naive:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
