"""Time per sequence of semi-autoregressive sampling without a cache, with the prefix cache and with the dual cache,
side by side in one process.

    python benchmarks/kv_cache.py --preset large --length 256 --block-length 32 --batch-size 1 [--json OUT]
    python benchmarks/kv_cache.py ... --prompt-tokens 256    # a fixed 256-token prefix before the generated tokens

A random-weight built-in base of the preset (timing needs no training) and, for `adjust`, an untrained head whose
output is not a no-op (as benchmarks/speed.py). Each row: sampler, K, cache, base passes, ms per sequence (best
of R) and tokens/s against the same sampler without a cache. Quality is measured on trained bases with
`jointdlm eval --block-length B --kv-cache prefix|dual` (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from jointdlm.models.loading import resolve_device
from jointdlm.models.mdlm import PRESETS
from jointdlm.sampling.loop import KV_CACHES, SamplingConfig
from jointdlm.sampling.registry import make_sampler

sys.path.insert(0, str(Path(__file__).parent))
from speed import best_of, live_head, random_base  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="large")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--samplers", default="sequential:1",
                        help="comma-separated NAME:K (sequential, parallel, adjust), e.g. sequential:1,adjust:4")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num", type=int, default=None, help="sequences per row (default: one batch)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="fixed tokens before the generated ones (a few-shot prompt), a multiple of the blocks")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.block_length < 1 or args.length < 1:
        print("kv_cache: error: --length and --block-length must be positive", file=sys.stderr)
        return 2
    if args.prompt_tokens < 0 or args.prompt_tokens % args.block_length:
        print(f"kv_cache: error: --prompt-tokens must be a multiple of --block-length ({args.block_length})",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    canvas = args.prompt_tokens + args.length
    model = random_base(args.preset, canvas, str(device))
    head = live_head(model)
    num = args.num or args.batch_size
    # The prompt: the first blocks of the canvas given (the loop skips blocks with nothing to fill), so every
    # block that is sampled attends to it; its ids are random ordinary tokens, the same for every sequence.
    init = torch.full((num, canvas), model.spec.mask_id)
    first = max(model.spec.never_sampled() + [model.spec.pad_id, model.spec.eos_id]) + 1
    ids = torch.randint(first, model.spec.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    init[:, :args.prompt_tokens] = ids
    print(f"# random-weight {args.preset}, {device}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {num} sequences x {args.length} tokens after a "
          f"{args.prompt_tokens}-token prompt, in blocks of "
          f"{args.block_length}, batch {args.batch_size}, best of {args.repeats}")
    rows = []
    print("| sampler | K | cache | base passes | ms/seq | tokens/s vs no cache |")
    print("|---|---|---|---|---|---|")
    for item in args.samplers.split(","):
        name, k = item.split(":")
        sampler = make_sampler(name, head=head) if name == "adjust" else make_sampler(name)
        uncached = None
        for cache in (None, *KV_CACHES):
            config = SamplingConfig(length=canvas, tokens_per_step=int(k), block_length=args.block_length,
                                    kv_cache=cache, batch_size=args.batch_size)
            best, out = best_of(model, sampler, config, num, args.repeats, init)
            uncached = uncached or best
            row = {"sampler": name, "k": int(k), "cache": cache or "none", "base_passes": out.counters.base_passes,
                   "ms_per_seq": 1000 * best / num, "speedup_vs_no_cache": uncached / best}
            rows.append(row)
            print(f"| {name} | {k} | {row['cache']} | {row['base_passes']:.1f} | {row['ms_per_seq']:.1f} "
                  f"| {row['speedup_vs_no_cache']:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
