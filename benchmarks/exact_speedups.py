"""Two changes that leave every number as it was, timed against what they replaced, interleaved in one process.

    python benchmarks/exact_speedups.py --threads 2 [--json OUT]

1. Rotary positions: `apply_rotary` (one complex product) against the rotation written out on strided halves,
   as it was before: one base pass of random-weight built-in bases, half the canvas masked (second-best of
   --repeats each). Outputs are checked equal.
2. The ADJUST head's carried keys and values (`HeadCarry`): whole ADJUST generations on `large` with the carry
   and with it switched off (best of --repeats each), at K=4 and K=8 (length 128, batch 8) and at K=4 after a
   prompt of --prompt-tokens random tokens (batch 4). Generated tokens are checked equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import live_head, random_base  # noqa: E402

import jointdlm.models.mdlm as mdlm  # noqa: E402
from jointdlm.adjust.head import HeadCarry  # noqa: E402
from jointdlm.sampling.loop import SamplingConfig, generate  # noqa: E402
from jointdlm.sampling.registry import make_sampler  # noqa: E402


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


def carry_rows(repeats: int, prompt_tokens: int) -> list[dict]:
    rows = []
    carried = HeadCarry.fresh
    for k, length, batch, prompt in ((4, 128, 8, 0), (8, 128, 8, 0), (4, 128 + prompt_tokens, 4, prompt_tokens)):
        base = random_base("large", length, "cpu")
        head = live_head(base)
        init = None
        if prompt:
            init = torch.full((batch, length), base.spec.mask_id)
            init[:, :prompt] = torch.randint(5, 4000, (batch, prompt), generator=torch.Generator().manual_seed(0))
        config = SamplingConfig(length=length, tokens_per_step=k, batch_size=batch)
        sampler = make_sampler("adjust", head=head)
        times, outs = {"carry": [], "no carry": []}, {}
        for _ in range(repeats):
            for name in ("carry", "no carry"):
                HeadCarry.fresh = carried if name == "carry" else (lambda self, *args: None)
                start = time.perf_counter()
                with torch.no_grad():
                    outs[name] = generate(base, sampler, config, num=batch, init=init).tokens
                times[name].append(time.perf_counter() - start)
        HeadCarry.fresh = carried
        with_carry, without = min(times["carry"]), min(times["no carry"])
        rows.append({"k": k, "length": length, "batch": batch, "prompt_tokens": prompt, "carry_s": with_carry,
                     "no_carry_s": without, "saved": 1 - with_carry / without,
                     "same_tokens": outs["carry"] == outs["no carry"]})
        print(f"ADJUST K={k}, length {length}, batch {batch}, prompt {prompt}: carry {with_carry:.2f} s, "
              f"without {without:.2f} s ({rows[-1]['saved']:.1%} saved), same tokens: {rows[-1]['same_tokens']}",
              flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rotary-repeats", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"command": " ".join(["python", *sys.argv]), "threads": torch.get_num_threads(),
              "rotary": rotary_rows(args.rotary_repeats), "carry": carry_rows(args.repeats, args.prompt_tokens)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
