"""Token draws by inverse CDF (`rules.draw` since 2026-12-07) against the Gumbel-max draws before them.

Both draw exactly from the tempered, truncated distribution, with noise keyed by (step seed, position, stream),
so samples stay independent of their batch; they differ in cost: Gumbel-max hashed one noise value per
vocabulary entry of every drawn position, the inverse CDF hashes one uniform per position and runs an exp and a
cumulative sum over the vocabulary. The samples differ (another draw of the same distribution).

1. Each draw's tokens against the exact distribution: 100,000 draws over a 50-word vocabulary at four settings
   (temperature, top-k, top-p), total variation from softmax(truncate(...)).
2. Whole generations of --num samples at batch --num, each sampler with either draw, interleaved in --rounds, the
   median of each; on --model / --adjust (a built-in base and its head) or a random-weight 12-layer base with a
   2,048-word vocabulary.

    python benchmarks/draw_speed.py --model runs/demo/english/model --adjust runs/demo/english/adjust
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sampler_time import load_runs, parse_runs, require_positive

from jointdlm.sampling import rules
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_from_spec

SAMPLERS = "sequential:1,parallel:4,parallel:16,parallel:48,adjust:4,adjust:48,adjust:threshold=0.9:48"


def gumbel_draw(lp, seeds, positions, temperature, top_k, top_p, stream=0):
    """`rules.draw` as it was until 2026-12-07: Gumbel-max noise over the whole vocabulary, a chunk of rows at a
    time (the reference)."""
    if temperature == 0:
        return lp.argmax(-1)
    rows = rules.chunk_rows(lp.shape[-1], lp.device)
    return torch.cat([rules.gumbel_grid(seeds[first:first + rows], positions[first:first + rows], lp.shape[-1], stream)
                      .add_(rules.truncate(lp[first:first + rows], temperature, top_k, top_p)).argmax(-1)
                      for first in range(0, max(1, len(lp)), rows)])


def distribution_rows(n: int = 100_000) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(1, 50, generator=gen) * 2, dim=-1)
    seeds = torch.randint(-2**62, 2**62, (n,), generator=gen)
    positions = torch.randint(0, 256, (n,), generator=gen)
    rows = []
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.9)):
        target = torch.softmax(rules.truncate(lp, temperature, top_k, top_p), dim=-1)[0]
        row = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        for name, draw in (("gumbel", gumbel_draw), ("inverse_cdf", rules.draw)):
            tokens = draw(lp.expand(n, -1), seeds, positions, temperature, top_k, top_p)
            freq = torch.bincount(tokens, minlength=50).double() / n
            row[f"{name}_tv"] = float(0.5 * (freq - target).abs().sum())
        rows.append(row)
        print(f"temperature {temperature}, top-k {top_k}, top-p {top_p}: total variation from the exact "
              f"distribution over {n:,} draws: Gumbel-max {row['gumbel_tv']:.4f}, inverse CDF "
              f"{row['inverse_cdf_tv']:.4f}", flush=True)
    return rows


def generation_rows(model: str | None, adjust: str | None, samplers: str, num: int, rounds: int) -> list[dict]:
    if model:
        base, head, parsed = load_runs(model, adjust, samplers)
    else:
        from speed import live_head, random_base

        base = random_base("deep", 47, "cpu", vocab_size=2048)
        with torch.no_grad():
            base.net.output.weight.mul_(30.0)  # peaked, as a trained base
        head = live_head(base)
        parsed = parse_runs(samplers, head)
    items = [(item, make_from_spec(spec, head=head), k) for item, spec, k in parsed]
    live = rules.draw
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(rounds):
            for item, sampler, k in items:
                for name, draw in (("gumbel", gumbel_draw), ("inverse_cdf", live)):
                    rules.draw = draw
                    config = SamplingConfig(length=base.max_length - 1, tokens_per_step=k, batch_size=num)
                    start = time.perf_counter()
                    with torch.no_grad():
                        generate(base, sampler, config, num=num)
                    times.setdefault((item, name), []).append(time.perf_counter() - start)
    finally:
        rules.draw = live
    rows = []
    for item, _, _ in items:
        gumbel, inverse = (statistics.median(times[(item, n)]) for n in ("gumbel", "inverse_cdf"))
        rows.append({"sampler": item, "gumbel_s": gumbel, "inverse_cdf_s": inverse, "speed_up": gumbel / inverse})
        print(f"{item}: Gumbel-max {gumbel:.3f} s, inverse CDF {inverse:.3f} s ({gumbel / inverse:.2f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--adjust")
    parser.add_argument("--samplers", default=SAMPLERS, help="comma-separated SPEC:K")
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_positive(parser, args, ("num", "rounds", "threads"))
    torch.set_num_threads(args.threads)
    distribution_rows()
    try:  # every spec is built before anything is timed: a bad one, or a bad directory, is one line
        generation_rows(args.model, args.adjust, args.samplers, args.num, args.rounds)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
