"""What stopping a sample at its text's end saves: every sampler with and without it, interleaved in one process.

A sample stops once a stop token (EOS, PAD, ...) is written with nothing masked before it (`SamplingConfig.
stop_at_text_end`, the default); `--whole-canvas` runs sample every position. The texts must come out the same
(checked: the script fails if any differs); what changes is the passes and the time. Each round runs every
sampler both ways in turn; prints base and head passes per sample, the median time of each and their ratio.

    python benchmarks/text_end.py --model runs/demo/english/model --adjust runs/demo/english/adjust \\
        --length 47 --samplers sequential:1,threshold:tau=0.9:1,adjust:4 [--block-length 16]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from sampler_time import load_runs, parse_timing_args, quartile_spread, timing_parser

from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_from_spec


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0], length=47, num=200, rounds=5)  # 47: the demo English canvas
    parser.add_argument("--block-length", type=int, default=None, help="semi-autoregressive blocks")
    args = parse_timing_args(parser)
    try:
        model, head, items = load_runs(args.model, args.adjust, args.samplers)
        configs = {stop: {k: SamplingConfig(length=args.length, tokens_per_step=k, block_length=args.block_length,
                                            seed=1, batch_size=args.batch_size, stop_at_text_end=stop)
                          for _, _, k in items} for stop in (False, True)}
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    times: dict[tuple[str, bool], list[float]] = {(item, stop): [] for item, _, _ in items for stop in (False, True)}
    passes: dict[tuple[str, bool], tuple[float, float]] = {}
    texts: dict[tuple[str, bool], list[str]] = {}
    with torch.no_grad():
        for _ in range(args.rounds):
            for item, spec, k in items:
                for stop in (False, True):
                    sampler = make_from_spec(spec, head=head, scorer=None)
                    start = time.perf_counter()
                    gen = generate(model, sampler, configs[stop][k], num=args.num)
                    times[item, stop].append(time.perf_counter() - start)
                    passes[item, stop] = (gen.counters.base_passes, gen.counters.extra_passes)
                    if texts.setdefault((item, stop), gen.texts) != gen.texts:
                        sys.exit(f"text_end: {item} wrote other texts in another round")
    blocks = f", blocks of {args.block_length}" if args.block_length else ""
    print(f"{args.num} samples, length {args.length}{blocks}, {args.rounds} rounds, {args.threads} threads")
    print("| sampler | base + head passes, whole canvas | stopped at the text's end | time, whole | stopped | ratio |")
    print("|---|---|---|---|---|---|")
    for item, _, _ in items:
        if texts[item, True] != texts[item, False]:
            differ = sum(a != b for a, b in zip(texts[item, True], texts[item, False], strict=True))
            sys.exit(f"text_end: {item}: {differ} of {args.num} texts differ with and without the stop")
        whole, stopped = (statistics.median(times[item, stop]) for stop in (False, True))
        (wb, wh), (sb, sh) = passes[item, False], passes[item, True]
        print(f"| {item} | {wb:.1f} + {wh:.1f} | {sb:.1f} + {sh:.1f} | {whole:.2f} s | {stopped:.2f} s | "
              f"{whole / stopped:.2f}x |")
        for stop in (False, True):
            spread = quartile_spread(times[item, stop])
            if spread is not None and spread > 0.15:
                print(f"text_end: warning: {item}'s runs spread {spread:.0%} of their median: the machine was not "
                      "steady; rerun before comparing", file=sys.stderr)


if __name__ == "__main__":
    main()
