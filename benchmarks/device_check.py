"""Every sampler on an accelerator, on every model family: the same seed gives the same samples at batch 1 and
batch 8 there, and how many samples match the CPU's token for token.

    python benchmarks/device_check.py --device cuda [--json OUT]

A random-weight `tiny` base whose output layer is scaled up, so its distributions are as peaked as a trained
model's (thresholds and tests then pass at some positions and fail at others), a random causal scorer (EDLM,
APD) and an untrained head whose output is not a no-op; and tiny checkpoints of the LLaDA and Dream families in the
style of the released files (the test suite's stand-ins, loaded through their own code), sampled after prompts of
unequal length. Each row: family, sampler, K, cache, whether batch 1 and batch 8 agree on the device, and the
share of samples equal to the CPU's. The CPU run is the reference the test suite pins;
an accelerator's matrix products round differently, so a sample may leave the CPU's path where two tokens are
near a tie, but on one device the batch must not matter. Exits 1 when it does.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from jointdlm.models.causal import CausalScorer
from jointdlm.models.loading import load_model, resolve_device
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
HF_ROWS = [row for row in ROWS if row[2] is None and not row[0].startswith(("edlm", "apd"))]
"""The Hugging Face families: no key-value caches (remote code computes every position) and no scorer."""
FAMILIES = ("builtin", "llada", "dream")
LENGTH, BLOCK, NUM, HF_LENGTH = 24, 8, 8, 10
PROMPTS = ["the cat", "a", "birds sing in the", "", "the dog ran", "a cat", "the", "sing in"]
"""Prompts of unequal length for the Hugging Face families: rows are left-padded (or grouped by length, for code
that ignores padding), the quirk the adapters hide."""


def builtin_models(device: str):
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


def hf_models(family: str, device: str, root: Path):
    """A tiny checkpoint in the style of the released LLaDA / Dream files (the test suite's stand-ins, their own code
    loaded with trust_remote_code) and an untrained head that is not a no-op."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_remote_code import write_checkpoint

    target = root / family
    if not target.exists():
        write_checkpoint(family, target)
    base = load_model(target, device, trust_remote_code=True)
    return base, None, live_head(base)


def run(family: str, device: str, root: Path) -> dict[tuple, tuple[list[list[list[int]]], float]]:
    """Samples per row, at batch 8 and at batch 1, and the base passes per sample."""
    hf = family != "builtin"
    base, scorer, head = hf_models(family, device, root) if hf else builtin_models(device)
    out = {}
    for spec, k, cache in HF_ROWS if hf else ROWS:
        sampler = make_from_spec(spec, head=head, scorer=scorer)
        samples = []
        for batch in (NUM, 1):
            config = SamplingConfig(length=HF_LENGTH if hf else LENGTH, tokens_per_step=k, batch_size=batch, seed=3,
                                    block_length=BLOCK if cache else None, kv_cache=cache)
            with torch.no_grad():
                gen = generate(base, sampler, config, prompts=PROMPTS) if hf else \
                    generate(base, sampler, config, num=NUM)
            samples.append(gen.tokens)
        out[(family, spec, k, cache)] = samples, gen.counters.base_passes
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    families = args.families.split(",")
    try:
        device = resolve_device(args.device)
        if unknown := set(families) - set(FAMILIES):
            raise ValueError(f"unknown families {', '.join(sorted(unknown))}; choose from {', '.join(FAMILIES)}")
    except ValueError as err:
        print(f"device_check: error: {err}", file=sys.stderr)
        return 2
    print(f"# {device_name(device)}, {platform.machine()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; random `tiny` built-in base ({NUM} samples x {LENGTH} tokens) and tiny "
          f"LLaDA / Dream-style checkpoints ({len(PROMPTS)} prompts of unequal length, {HF_LENGTH} tokens); "
          f"batch {NUM} and 1")
    rows, ok = [], True
    print("| family | sampler | K | cache | base passes | batch 8 = batch 1 on the device "
          "| samples equal to the CPU's |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for family in families:
            on_device, on_cpu = run(family, str(device), Path(root)), run(family, "cpu", Path(root))
            for (_, spec, k, cache), ((together, alone), passes) in on_device.items():
                same_batch = together == alone
                reference = on_cpu[(family, spec, k, cache)][0][0]
                equal_cpu = sum(a == b for a, b in zip(together, reference, strict=True)) / len(together)
                ok &= same_batch
                rows.append({"family": family, "sampler": spec, "k": k, "cache": cache or "none",
                             "base_passes": passes, "batch_independent": same_batch, "equal_to_cpu": equal_cpu})
                print(f"| {family} | {spec} | {k} | {cache or 'none'} | {passes:.1f} "
                      f"| {'yes' if same_batch else '**no**'} | {equal_cpu:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "device": device_name(device), "rows": rows}, f,
                      indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
