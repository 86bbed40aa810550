"""What a CUDA graph would save on ADJUST's head rounds: one round (a head pass at the step's candidates, log-probs,
the pick, the Gumbel draw) eagerly and as a captured graph replayed, on a random-weight base of the Dream-7B shape.

    python benchmarks/cuda_graph_round.py [--batch-size 8] [--candidates 8]

A measurement for the next step, not a code path: the sampler runs its rounds eagerly. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import live_head, random_base  # noqa: E402

from jointdlm.sampling import rules  # noqa: E402


def timed(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--candidates", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_graph_round: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    b, length, c = args.batch_size, args.length, args.candidates
    base = random_base("dream-7b", length, "cuda", layers=2, dtype=torch.bfloat16)  # the head does not see depth
    head = live_head(base)
    tokens = torch.full((b, length + 1), base.spec.mask_id, device="cuda")
    tokens[:, 0] = 1
    attention = torch.ones(b, length + 1, dtype=torch.long, device="cuda")
    generator = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(length, generator=generator)[:c] + 1 for _ in range(b)]).sort(-1).values
    index = index.cuda()
    banned = base.spec.never_sampled()
    seeds, shift = rules.row_keys(list(range(b)), None, "cuda")
    with torch.no_grad():
        hidden = base.forward(tokens, attention, at=tokens == base.spec.mask_id).hidden
        passes = head.step_passes(base, attention, hidden, index)
        passes.logits(tokens)  # the step's first pass: keys and values over the canvas
        written = index[:, 0].clone()
        tokens[torch.arange(b), written] = 7

        def one_pass():
            return passes.logits(tokens, written)

        def one_round():
            logits = rules.without_banned(passes.logits(tokens, written), banned, overwrite=True)
            pick = rules.top_probability(logits).double().argmax(-1)
            at = torch.log_softmax(logits.gather(1, pick[:, None, None].expand(-1, 1, logits.shape[-1])).squeeze(1), -1)
            return rules.draw(at, seeds, index.gather(1, pick[:, None]).squeeze(1) - shift, 1.0, 0, 1.0)

        for name, fn in (("head pass", one_pass), ("round", one_round)):
            eager = timed(fn)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            print(f"{name} (batch {b}, {c} candidates, vocabulary {base.spec.vocab_size}): eager {eager:.3f} ms, "
                  f"graph replayed {timed(graph.replay):.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
