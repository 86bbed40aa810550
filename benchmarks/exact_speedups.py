"""Changes that leave every number as it was, timed against what they replaced, interleaved in one process.

    python benchmarks/exact_speedups.py --threads 2 [--json OUT]
    python benchmarks/exact_speedups.py --only passes --device cuda --shapes large:128:8:4+8 [--dtype bfloat16]

1. Rotary positions: `apply_rotary` (one complex product) against the rotation written out on strided halves,
   as it was before: one base pass of random-weight built-in bases, half the canvas masked (second-best of
   --repeats each). Outputs are checked equal.
2. ADJUST's head passes at fixed shapes (`StepPasses`: every candidate queried, keys and values recomputed only
   where a token was written, nothing read back) against the step as it was before (`GeneralPassAdjust`: the
   general pass with carried keys and values, shapes that follow the data): whole generations of random-weight
   bases with a live head, median of max(--repeats, 5), interleaved, at each --shapes entry
   (PRESET:LENGTH:BATCH:K+K+SPEC/K; `deep` at length 23 with a vocabulary of 734 is the demo's template shape),
   on --device with --dtype weights. Generated tokens are checked equal.
3. Drawing tokens: the Gumbel noise of 500 x 23 sampled tokens at four chunk sizes, then `sample_at` against its
   form before 2026-12-04 (noise in chunks of 1 << 22 values, and a
   second log-softmax of the sampled rows in float64): whole generations of fast samplers at batch 500 on a
   random-weight base of the demo's template shape (12 layers, d=48, vocabulary 734, 23 tokens) whose output is
   scaled to be peaked, or on --model and --adjust (the demo's template base and head: `make demo`), median of
   --repeats, interleaved. Generated tokens are checked equal (both with Gumbel-max draws, as the change was made
   on them: `rules.draw` inverts the cumulative distribution since 2026-12-07, benchmarks/draw_speed.py).
4. Attention written out (`mdlm.written_out_attention`) against torch's fused kernel: one call at the shapes of
   the demo's template base (batch 500 x 4 heads x 24 positions x 12), of a head pass there (8 queries), at head
   sizes 16, 24 and 64 (where `mdlm.attention` keeps the fused kernel); and whole naive K=4 generations with
   `mdlm.attention` as it dispatches against the fused kernel everywhere, as in part 3 (median of --repeats,
   interleaved). Generated tokens are compared (float rounding differs, so a near-tie may fall the other way).
5. Work over the vocabulary (2026-12-07): `rules.draw` a chunk of rows at a time against every row at once,
   ADJUST's head passes scoring candidates with `rules.top_probability` against full log-probabilities, and a
   base pass's log-probabilities in place a chunk of rows at a time against a fresh output: all three forms before,
   draws alone, and now: whole generations of 200 samples (naive K=16 and 48, ADJUST K=48 and
   `adjust:threshold=0.9` K <= 48) on --vocabulary-model and --vocabulary-adjust (the English 12-layer base and
   head of docs/results.md §5) or a random-weight 12-layer base with a 2,048-word vocabulary, median of --repeats,
   interleaved. Generated tokens are checked equal. All three forms draw with Gumbel-max noise, as the changes
   were made on it (`rules.draw` inverts the cumulative distribution since: benchmarks/draw_speed.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from draw_speed import gumbel_draw  # noqa: E402  (Gumbel-max draws, as parts 3 and 5 were made on them)
from speed import live_head, random_base  # noqa: E402

import jointdlm.models.mdlm as mdlm  # noqa: E402
import jointdlm.sampling.rules as rules  # noqa: E402
from jointdlm.adjust.head import AdjustHead, HeadCarry  # noqa: E402
from jointdlm.models.mdlm import BuiltinModel  # noqa: E402
from jointdlm.sampling.adjust import AdjustSampler  # noqa: E402
from jointdlm.sampling.base import StepContext, StepResult  # noqa: E402
from jointdlm.sampling.loop import SamplingConfig, generate  # noqa: E402
from jointdlm.sampling.registry import make_from_spec, make_sampler  # noqa: E402
from jointdlm.sampling.rules import select_top  # noqa: E402
from jointdlm.sampling.threshold import threshold_round  # noqa: E402


def written_out_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation as `apply_rotary` computed it before (the reference it is timed and checked against)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rotary_rows(repeats: int) -> list[dict]:
    rows = []
    fast = mdlm.apply_rotary
    for preset, length, batch in (("large", 128, 8), ("base", 256, 8), ("deep", 64, 64), ("tiny", 64, 64)):
        base = random_base(preset, length, "cpu", vocab_size=1024)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(5, 1000, (batch, length), generator=gen)
        masked = torch.rand(batch, length, generator=gen) < 0.5
        tokens[masked] = base.spec.mask_id
        times, outs = {"written out": [], "complex": []}, {}
        with torch.no_grad():
            for _ in range(repeats):
                for name, fn in (("written out", written_out_rotary), ("complex", fast)):
                    mdlm.apply_rotary = fn
                    start = time.perf_counter()
                    outs[name] = base.forward(tokens, None, at=masked).logits
                    times[name].append(time.perf_counter() - start)
        mdlm.apply_rotary = fast
        old, new = (sorted(times[n])[min(1, repeats - 1)] * 1000 for n in ("written out", "complex"))
        rows.append({"preset": preset, "length": length, "batch": batch, "written_out_ms": old, "complex_ms": new,
                     "speed_up": old / new, "same_logits": bool(torch.equal(outs["written out"], outs["complex"]))})
        print(f"rotary, one base pass, {preset} (length {length}, batch {batch}): written out {old:.1f} ms, "
              f"complex {new:.1f} ms, {old / new:.3f}x, same logits: {rows[-1]['same_logits']}", flush=True)
    return rows


class GeneralPassAdjust(AdjustSampler):
    """ADJUST's step as it was before 2026-12-04's fixed-shape passes (the reference part 2 times and checks the
    sampler against): each head pass through the general pass (`AdjustHead.forward`: keys and values carried
    from the step's previous pass and recomputed at every masked position and the ones written since, queries at
    the masked candidates, logits there), each round on log-probabilities at the remaining candidates only. Its
    threshold round accepts positions as the sampler's does (by the drawn token's probability, since 2026-12-07)."""

    def step(self, ctx: StepContext) -> StepResult:
        out = ctx.forward()
        hidden, logits = out.hidden, out.logits
        tokens, eligible = ctx.tokens.clone(), ctx.eligible.clone()
        fill = torch.zeros_like(eligible)
        budget = ctx.budget.to(tokens.device)
        writing = budget > 0
        entropy_sum = torch.zeros(len(tokens), dtype=torch.float64, device=tokens.device)
        entropy_max = torch.zeros_like(entropy_sum)
        head_passes = torch.zeros(len(tokens), dtype=torch.long)
        carry = HeadCarry()
        candidates = None
        for r in range(int(budget.max())):
            logprobs = ctx.logprobs(logits, where=eligible)
            scores = ctx.scores(logprobs, eligible)
            if r == 0 and self.config.threshold is not None:
                confidence = scores if ctx.choice.rule == "confidence" else \
                    ctx.scores(logprobs, eligible, rule="confidence")
                chosen, _ = threshold_round(ctx, logprobs, confidence, self.opening, writing)
            else:
                chosen = select_top(scores, writing.long())
            if self.config.gamma is not None:
                writing &= self._general_passes(logprobs, chosen, entropy_sum, entropy_max, first=r == 0)
                chosen &= writing[:, None]
            drawn = ctx.sample(logprobs, chosen)
            if self.config.tau is not None and r > 0:  # the drawn token's probability, as the sampler tests it
                likely = logprobs.at(chosen).gather(1, drawn[chosen][:, None]).squeeze(1).exp() >= self.config.tau
                passed = torch.zeros_like(writing)
                passed[chosen.any(-1)] = likely
                writing &= passed
                chosen &= writing[:, None]
            if not writing.any():
                break
            tokens = torch.where(chosen, drawn, tokens)
            fill |= chosen
            eligible = eligible & ~chosen
            if r == 0:
                candidates = select_top(scores.masked_fill(chosen, -torch.inf),
                                        (budget - 1).clamp(min=self.config.candidates))
                eligible &= candidates
            writing &= (budget > r + 1) & eligible.any(-1)
            if not writing.any():
                break
            with torch.no_grad():
                start = self.head.pass_input(out.hidden, hidden)
                hidden, logits = self.head(ctx.model, tokens, ctx.attention_mask, start, at=eligible, carry=carry,
                                           query=candidates)
            head_passes += writing.cpu()
        return StepResult(fill=fill, tokens=tokens, base_passes=1, extra_passes=head_passes)

    def _general_passes(self, logprobs, chosen, entropy_sum, entropy_max, first):
        at = logprobs.at(chosen)
        rows = chosen.any(-1)
        passed = torch.zeros_like(rows)
        entropy = -(at.exp() * at.clamp(min=-1e30)).nan_to_num(0.0).sum(-1).double()
        new_sum = entropy_sum[rows] + entropy
        new_max = torch.maximum(entropy_max[rows], entropy)
        ok = torch.ones_like(new_sum, dtype=torch.bool) if first else new_sum - new_max <= self.config.gamma
        passed[rows] = ok
        entropy_sum[rows] = torch.where(ok, new_sum, entropy_sum[rows])
        entropy_max[rows] = torch.where(ok, new_max, entropy_max[rows])
        return passed


def passes_rows(repeats: int, shapes: list[str], device: str, dtype: str) -> list[dict]:
    """Part 2: whole ADJUST generations, the sampler against `GeneralPassAdjust`, interleaved."""
    rows = []
    for shape in shapes:
        preset, length, batch, ks = shape.split(":", 3)
        length, batch = int(length), int(batch)
        base = random_base(preset, length, device, vocab_size=734 if preset == "deep" else None,
                           dtype=getattr(torch, dtype))
        head = live_head(base)
        for k in ks.split("+"):
            spec, _, k = k.rpartition("/")
            spec, k = spec or "adjust", int(k)
            config = SamplingConfig(length=length, tokens_per_step=k, batch_size=batch)
            samplers = {"general pass": GeneralPassAdjust(head, config=make_from_spec(spec, head=head).config),
                        "fixed shapes": make_from_spec(spec, head=head)}
            times, outs = {name: [] for name in samplers}, {}
            for _ in range(repeats):
                for name, sampler in samplers.items():
                    if base.device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    outs[name] = generate(base, sampler, config, num=batch).tokens
                    times[name].append(time.perf_counter() - start)
            old, new = (statistics.median(times[name]) * 1000 / batch for name in samplers)
            rows.append({"preset": preset, "length": length, "batch": batch, "sampler": spec, "k": k,
                         "device": str(base.device), "dtype": dtype, "general_ms_per_seq": old,
                         "fixed_ms_per_seq": new, "speed_up": old / new,
                         "same_tokens": outs["general pass"] == outs["fixed shapes"]})
            print(f"{spec} K={k}, {preset} (length {length}, batch {batch}, {base.device}, {dtype}): general pass "
                  f"{old:.2f} ms/seq, fixed shapes {new:.2f} ms/seq, {old / new:.3f}x, same tokens: "
                  f"{rows[-1]['same_tokens']}", flush=True)
    return rows


def renormalising_sample_at(logprobs, fill, step_seeds, temperature, top_k, top_p, stream=0, offsets=None):
    """`rules.sample_at` as it drew tokens before (the reference it is timed and checked against; untempered,
    untruncated draws only)."""
    tokens = torch.zeros(fill.shape, dtype=torch.long, device=fill.device)
    rows, positions = fill.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return tokens
    lp = torch.log_softmax(logprobs.at(fill).double(), dim=-1)
    seeds = torch.tensor(list(step_seeds), dtype=torch.int64)[rows]
    shift = torch.tensor(list(offsets) if offsets else [0] * len(step_seeds), dtype=torch.int64)[rows]
    chunk, rules.NOISE_CHUNK = rules.NOISE_CHUNK, 1 << 22
    try:
        noisy = rules.gumbel_grid(seeds, positions - shift, lp.shape[-1], stream).add_(lp)
    finally:
        rules.NOISE_CHUNK = chunk
    tokens[rows, positions] = noisy.argmax(-1)
    return tokens


def draw_rows(repeats: int, model: str | None, adjust: str | None) -> list[dict]:
    rows = []
    if model:
        base = BuiltinModel.load(model)
        head = AdjustHead.from_pretrained(adjust, base)
    else:
        base = random_base("deep", 23, "cpu", vocab_size=734)
        with torch.no_grad():
            base.net.output.weight.mul_(30.0)  # peaked, as a trained base: the threshold fills several per step
        head = live_head(base)
    gen = torch.Generator().manual_seed(0)
    seeds, positions = torch.randint(2**62, (11500,), generator=gen), torch.randint(23, (11500,), generator=gen)
    chunk = rules.NOISE_CHUNK
    for size in (1 << 16, 1 << 18, 1 << 20, 1 << 22):  # the noise of 500 x 23 sampled tokens at each chunk size
        rules.NOISE_CHUNK = size
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            rules.gumbel_grid(seeds, positions, 734)
            times.append(time.perf_counter() - start)
        rows.append({"noise_chunk": size, "ms": 1000 * statistics.median(times)})
        print(f"Gumbel noise, 11,500 x 734 values in chunks of {size}: {rows[-1]['ms']:.1f} ms", flush=True)
    rules.NOISE_CHUNK = chunk
    drawn = rules.sample_at
    # ADJUST's head rounds draw through `rules.draw` since their fixed-shape passes (c853741), not `sample_at`:
    # an adjust row here would time today's draw in both arms, so part 3 has none (results §6 has the row as it
    # was measured, at 2150a9a).
    live_draw = rules.draw
    for spec, k in (("threshold:tau=0.5:extra=1", 1), ("parallel", 4)):
        sampler = make_from_spec(spec, head=head)
        config = SamplingConfig(length=23, tokens_per_step=k, batch_size=500)
        times, outs = {"before": [], "now": []}, {}
        rules.draw = gumbel_draw  # both arms draw with Gumbel-max noise, as then
        try:
            for _ in range(repeats):
                for name in ("before", "now"):
                    rules.sample_at = renormalising_sample_at if name == "before" else drawn
                    start = time.perf_counter()
                    with torch.no_grad():
                        outs[name] = generate(base, sampler, config, num=500).tokens
                    times[name].append(time.perf_counter() - start)
        finally:
            rules.sample_at, rules.draw = drawn, live_draw
        before, now = (statistics.median(times[n]) for n in ("before", "now"))
        rows.append({"sampler": spec, "k": k, "before_s": before, "now_s": now, "speed_up": before / now,
                     "same_tokens": outs["before"] == outs["now"]})
        print(f"drawing tokens, {spec} K={k}, 500 x 23 tokens: before {before:.3f} s, now {now:.3f} s, "
              f"{before / now:.2f}x, same tokens: {rows[-1]['same_tokens']}", flush=True)
    return rows


def attention_rows(repeats: int, model: str | None) -> list[dict]:
    def fused(q, k, v, attn_mask=None, is_causal=False):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    written, dispatched = mdlm.written_out_attention, mdlm.attention
    rows = []
    gen = torch.Generator().manual_seed(0)
    for b, h, m, t, d in ((500, 4, 24, 24, 12), (500, 4, 8, 24, 12), (64, 4, 64, 64, 16), (64, 4, 64, 64, 24),
                          (8, 12, 128, 128, 64)):
        q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (m, t, t))
        mask = torch.ones(b, 1, m, t, dtype=torch.bool)
        times = {"fused": [], "written": []}
        for _ in range(max(repeats, 15)):
            for name, fn in (("fused", fused), ("written", written)):
                start = time.perf_counter()
                fn(q, k, v, mask)
                times[name].append(time.perf_counter() - start)
        old, new = (1000 * statistics.median(times[n]) for n in ("fused", "written"))
        rows.append({"shape": [b, h, m, t, d], "fused_ms": old, "written_ms": new, "speed_up": old / new})
        print(f"attention {b}x{h} heads, {m} queries x {t} keys, head size {d}: fused {old:.2f} ms, "
              f"now {new:.2f} ms ({old / new:.2f}x)", flush=True)
    base = BuiltinModel.load(model) if model else random_base("deep", 23, "cpu", vocab_size=734)
    config = SamplingConfig(length=base.max_length - 1, tokens_per_step=4, batch_size=500)
    times, outs = {"fused": [], "written": []}, {}
    for _ in range(repeats):
        for name, fn in (("fused", fused), ("written", dispatched)):
            mdlm.attention = fn
            start = time.perf_counter()
            with torch.no_grad():
                outs[name] = generate(base, make_sampler("parallel"), config, num=500).tokens
            times[name].append(time.perf_counter() - start)
    mdlm.attention = dispatched
    old, new = (statistics.median(times[n]) for n in ("fused", "written"))
    same = sum(a == b for a, b in zip(outs["fused"], outs["written"], strict=True))
    rows.append({"generation": "naive K=4, 500 samples", "fused_s": old, "written_s": new, "speed_up": old / new,
                 "same_samples": same})
    print(f"naive K=4, 500 x {config.length} tokens: fused {old:.3f} s, now {new:.3f} s ({old / new:.2f}x), "
          f"{same}/500 samples the same", flush=True)
    return rows


def whole_draw(lp, seeds, positions, temperature, top_k, top_p, stream=0):
    """`rules.draw` as it was before 2026-12-07: every row's scores and noise at once (the reference)."""
    if temperature == 0:
        return lp.argmax(-1)
    lp = rules.truncate(lp, temperature, top_k, top_p)
    return rules.gumbel_grid(seeds, positions, lp.shape[-1], stream).add_(lp).argmax(-1)


def log_softmax_top_probability(logits):
    """The confidence of every candidate as ADJUST's head passes computed it before 2026-12-07: from the full
    log-probabilities (the reference; the pass then also normalises the chosen row, a (batch x vocabulary) cost)."""
    return rules.marginal_scores(torch.log_softmax(logits, dim=-1), "confidence")


def whole_logprobs(logits, banned, overwrite=False):
    """`rules.model_logprobs` as it was before 2026-12-07: one fresh output for every row (the reference)."""
    return torch.log_softmax(rules.without_banned(logits, banned, overwrite), dim=-1)


def vocabulary_rows(repeats: int, model: str | None, adjust: str | None, preset: str = "deep",
                    num: int = 200) -> list[dict]:
    """Whole generations of `num` samples with draws a chunk of rows at a time, head passes that score candidates
    from their logits and log-probabilities in place, against the three as they were, interleaved (a random base
    of `preset`'s shape without `model`)."""
    if model:
        base = BuiltinModel.load(model)
        head = AdjustHead.from_pretrained(adjust, base)
    else:
        base = random_base(preset, 47, "cpu", vocab_size=2048)
        with torch.no_grad():
            base.net.output.weight.mul_(30.0)
        head = live_head(base)
    length = base.max_length - 1
    forms = {"before": (whole_draw, log_softmax_top_probability, whole_logprobs),
             "chunked draws": (gumbel_draw, log_softmax_top_probability, whole_logprobs),
             "now": (gumbel_draw, rules.top_probability, rules.model_logprobs)}
    now = (rules.draw, rules.top_probability, rules.model_logprobs)  # restored after (draws by inverse CDF since)
    rows = []
    for spec, k in (("parallel", 16), ("parallel", 48), ("adjust:threshold=0.9", 48), ("adjust", 48)):
        sampler = make_from_spec(spec, head=head)
        config = SamplingConfig(length=length, tokens_per_step=k, batch_size=num)
        times, outs = {name: [] for name in forms}, {}
        try:
            for _ in range(repeats):
                for name, (draw, top_probability, model_logprobs) in forms.items():
                    rules.draw, rules.top_probability, rules.model_logprobs = draw, top_probability, model_logprobs
                    start = time.perf_counter()
                    with torch.no_grad():
                        outs[name] = generate(base, sampler, config, num=num).tokens
                    times[name].append(time.perf_counter() - start)
        finally:
            rules.draw, rules.top_probability, rules.model_logprobs = now
        median = {name: statistics.median(times[name]) for name in forms}
        rows.append({"sampler": spec, "k": k, **{f"{name}_s": t for name, t in median.items()},
                     "speed_up": median["before"] / median["now"],
                     "same_tokens": all(outs[name] == outs["before"] for name in forms)})
        print(f"{spec} K={k}, {num} x {length} tokens: before {median['before']:.3f} s, chunked draws "
              f"{median['chunked draws']:.3f} s, now {median['now']:.3f} s ({rows[-1]['speed_up']:.2f}x), "
              f"same tokens: {rows[-1]['same_tokens']}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rotary-repeats", type=int, default=7)
    parser.add_argument("--shapes", default="tiny:64:8:4+8,deep:23:500:4+8+adjust:threshold=0.5/2",
                        help="part 2: PRESET:LENGTH:BATCH:K+K+SPEC/K,...")
    parser.add_argument("--device", default="cpu", help="part 2's device")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="part 2's weights")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default=None, help="part 3 on this template-language base (else random)")
    parser.add_argument("--adjust", default=None, help="with --model: its ADJUST head")
    parser.add_argument("--vocabulary-model", default=None, help="part 5 on this base (else random)")
    parser.add_argument("--vocabulary-adjust", default=None, help="with --vocabulary-model: its ADJUST head")
    parser.add_argument("--only", choices=("rotary", "passes", "draw", "attention", "vocabulary"), default=None,
                        help="run one part")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {"rotary": lambda: rotary_rows(args.rotary_repeats),
             "passes": lambda: passes_rows(max(args.repeats, 5), args.shapes.split(","), args.device, args.dtype),
             "draw": lambda: draw_rows(max(args.repeats, 5), args.model, args.adjust),
             "attention": lambda: attention_rows(max(args.repeats, 5), args.model),
             "vocabulary": lambda: vocabulary_rows(max(args.repeats, 5), args.vocabulary_model, args.vocabulary_adjust)}
    if args.adjust and not args.model or args.model and args.only in (None, "draw") and not args.adjust:
        print("exact_speedups: error: --model and --adjust go together for part 3 (draw)", file=sys.stderr)
        return 2
    if bool(args.vocabulary_model) != bool(args.vocabulary_adjust):
        print("exact_speedups: error: --vocabulary-model and --vocabulary-adjust go together", file=sys.stderr)
        return 2
    result = {"command": " ".join(["python", *sys.argv]), "threads": torch.get_num_threads()}
    try:
        for name, part in parts.items():
            if args.only in (None, name):
                result[name] = part()
    except (FileNotFoundError, ValueError) as err:  # a --model or --adjust directory that is not one
        print(f"exact_speedups: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
