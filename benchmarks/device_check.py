"""Every sampler on an accelerator: the same seed gives the same samples at batch 1 and batch 8 there, and how
many samples match the CPU's token for token.

    python benchmarks/device_check.py --device cuda [--json OUT]

A random-weight `tiny` base whose output layer is scaled up, so its distributions are as peaked as a trained
model's (thresholds and tests then pass at some positions and fail at others), a random causal scorer (EDLM,
APD) and an untrained head whose output is not a no-op. Each row: sampler, K, cache, whether batch 1 and batch 8
agree on the device, and the share of samples equal to the CPU's. The CPU run is the reference the test suite pins;
an accelerator's matrix products round differently, so a sample may leave the CPU's path where two tokens are
near a tie, but on one device the batch must not matter. Exits 1 when it does.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from jointdlm.models.causal import CausalScorer
from jointdlm.models.loading import resolve_device
from jointdlm.models.mdlm import BuiltinModel, MaskedDiffusionTransformer, MDLMConfig
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_from_spec

sys.path.insert(0, str(Path(__file__).parent))
from speed import device_name, live_head, random_base  # noqa: E402

ROWS = [("sequential", 1, None), ("parallel", 4, None), ("adjust", 4, None), ("adjust:tau=0.9", 4, None),
        ("adjust:gamma=1", 4, None), ("adjust:threshold=0.5", 2, None), ("threshold", 1, None),
        ("threshold:tau=0.5:extra=1", 1, None), ("eb", 1, None), ("punt", 1, None), ("punt:via=adjust", 1, None),
        ("edlm:proposals=3", 1, None), ("apd", 1, None), ("sequential", 1, "prefix"), ("parallel", 4, "dual"),
        ("adjust", 4, "prefix")]
LENGTH, BLOCK, NUM = 24, 8, 8


def models(device: str):
    """The base (peaked), the scorer and the head, built on the CPU from seeds and moved to `device`."""
    base = random_base("tiny", LENGTH, "cpu")
    with torch.no_grad():
        base.net.output.weight.mul_(30.0)
    torch.manual_seed(1)
    causal = MaskedDiffusionTransformer(MDLMConfig(vocab_size=base.spec.vocab_size, max_length=LENGTH + 1,
                                                   d_model=64, n_layers=2, n_heads=4, causal=True))
    scorer = CausalScorer(BuiltinModel(causal.eval().requires_grad_(False), base.tokenizer))
    head = live_head(base)
    scorer.model.to(device)
    return base.to(device), scorer, head.to(device)


def run(device: str) -> dict[tuple, tuple[list[list[list[int]]], float]]:
    """Samples per row, at batch 8 and at batch 1, and the base passes per sample."""
    base, scorer, head = models(device)
    out = {}
    for spec, k, cache in ROWS:
        sampler = make_from_spec(spec, head=head, scorer=scorer)
        samples = []
        for batch in (NUM, 1):
            config = SamplingConfig(length=LENGTH, tokens_per_step=k, batch_size=batch, seed=3,
                                    block_length=BLOCK if cache else None, kv_cache=cache)
            with torch.no_grad():
                gen = generate(base, sampler, config, num=NUM)
            samples.append(gen.tokens)
        out[(spec, k, cache)] = samples, gen.counters.base_passes
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"device_check: error: {err}", file=sys.stderr)
        return 2
    print(f"# {device_name(device)}, {platform.machine()}, torch {torch.__version__}; random `tiny` base, "
          f"{NUM} samples x {LENGTH} tokens, batch {NUM} and 1")
    on_device, on_cpu = run(str(device)), run("cpu")
    rows, ok = [], True
    print("| sampler | K | cache | base passes | batch 8 = batch 1 on the device | samples equal to the CPU's |")
    print("|---|---|---|---|---|---|")
    for (spec, k, cache), ((together, alone), passes) in on_device.items():
        same_batch = together == alone
        equal_cpu = sum(a == b for a, b in zip(together, on_cpu[(spec, k, cache)][0][0], strict=True)) / NUM
        ok &= same_batch
        rows.append({"sampler": spec, "k": k, "cache": cache or "none", "base_passes": passes,
                     "batch_independent": same_batch, "equal_to_cpu": equal_cpu})
        print(f"| {spec} | {k} | {cache or 'none'} | {passes:.1f} | {'yes' if same_batch else '**no**'} "
              f"| {equal_cpu:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "device": device_name(device), "rows": rows}, f,
                      indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
