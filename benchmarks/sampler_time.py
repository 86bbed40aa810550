"""Wall time of whole generations, sampler against sampler, in one process (no quality scoring).

Each round runs every sampler once on the same samples, in turn, so slow phases of the machine hit all of them;
prints each sampler's median over the rounds and every run.

    python benchmarks/sampler_time.py --model runs/demo/template/model --adjust runs/demo/template/adjust \\
        --length 23 --samplers sequential:1,parallel:4,adjust:4,threshold:tau=0.5:extra=1:1,adjust:threshold=0.5:2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jointdlm.adjust.head import AdjustHead
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_from_spec


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """A one-line error for a count below 1 (these scripts' counts: length, samples, batch, rounds, threads)."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def load_runs(model_dir: str, adjust_dir: str | None,
              samplers: str) -> tuple[BuiltinModel, AdjustHead | None, list[tuple[str, str, int]]]:
    """The base, its head (if given) and each `SPEC:K` of the comma-separated `samplers` as (item, spec, K); every
    spec is built once, so a bad one fails (ValueError) before anything runs."""
    model = BuiltinModel.load(model_dir)
    head = AdjustHead.from_pretrained(adjust_dir, model) if adjust_dir else None
    return model, head, parse_runs(samplers, head)


def parse_runs(samplers: str, head: AdjustHead | None) -> list[tuple[str, str, int]]:
    """Each `SPEC:K` of the comma-separated `samplers` as (item, spec, K), each spec built once with `head`, so a
    bad one fails (ValueError) before anything runs."""
    items = []
    for item in samplers.split(","):
        spec, _, k = item.rpartition(":")
        if not spec or not k.isdigit():
            raise ValueError(f"each sampler is SPEC:K (K tokens per step), got {item!r}")
        make_from_spec(spec, head=head, scorer=None)
        items.append((item, spec, int(k)))
    return items


UNSTEADY = 0.15
"""Quartile spread above which a sampler's median is not trusted: steady runs on 2 cores spread 5-10%; a run
whose rows later did not hold up spread 25% or more (docs/results.md §6)."""


def quartile_spread(values: list[float]) -> float | None:
    """(third quartile - first quartile) / median of the runs; None below 4 runs."""
    if len(values) < 4:
        return None
    first, _, third = statistics.quantiles(values, n=4)
    return (third - first) / statistics.median(values)


def timing_parser(description: str, length: int, num: int, rounds: int) -> argparse.ArgumentParser:
    """The flags of a script that times whole generations of SPEC:K samplers on a base (and its head) in rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adjust", help="ADJUST head directory (for adjust samplers)")
    parser.add_argument("--samplers", required=True, help="comma-separated SPEC:K (K: tokens per step)")
    parser.add_argument("--length", type=int, default=length)
    parser.add_argument("--num", type=int, default=num)
    parser.add_argument("--batch-size", type=int, default=num)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def parse_timing_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed flags, every count checked (one-line error), torch's threads set."""
    args = parser.parse_args()
    require_positive(parser, args, ("length", "num", "batch_size", "rounds", "threads"))
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], length=32, num=500, rounds=7)
    args = parse_timing_args(parser)
    try:
        model, head, items = load_runs(args.model, args.adjust, args.samplers)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    runs = [(item, make_from_spec(spec, head=head, scorer=None),
             SamplingConfig(length=args.length, tokens_per_step=k, seed=1, batch_size=args.batch_size))
            for item, spec, k in items]
    times: dict[str, list[float]] = {item: [] for item, _, _ in runs}
    with torch.no_grad():
        for _ in range(args.rounds):
            for item, sampler, config in runs:
                start = time.perf_counter()
                generate(model, sampler, config, num=args.num)
                times[item].append(time.perf_counter() - start)
    for item, values in times.items():
        print(f"{item}: median {statistics.median(values):.3f} s  ({' '.join(f'{v:.2f}' for v in values)})")
        spread = quartile_spread(values)
        if spread is not None and spread > UNSTEADY:
            print(f"sampler_time: warning: {item}'s middle half of runs spans {spread:.0%} of its median: the "
                  "machine was not steady (another job?); rerun before comparing", file=sys.stderr)


if __name__ == "__main__":
    main()
