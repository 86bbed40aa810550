"""Does the built-in base learn a toy language? Pre-train variants on one corpus, then K=1 validity (exact).

Each variant is a `PretrainConfig` override set; every run starts from the same corpus and seed, and reports the
held-out loss curve and the validity of 500 K=1 samples (sampling seed 1).

    python benchmarks/pretrain_learns.py --language seating --variants default "lr=0.003" "lr=0.003,batch_size=256"

Runs are cached under --workdir by preset and resolved settings (docs/results.md §10). Runs last 2,000 steps
unless a variant says otherwise: what §10 measured, `pretrain`'s default then (`max_steps=6000` is today's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from adjust_recipe import parse_overrides  # benchmarks/ is on the path when a script there runs

from jointdlm.data import get_language, validity_rate, write_corpus
from jointdlm.models.train import PretrainConfig, pretrain
from jointdlm.sampling.loop import SamplingConfig, fill_length, generate
from jointdlm.sampling.registry import make_sampler


def parse_variant(text: str) -> dict:
    """'default' (no override) or key=value[,key=value] as `PretrainConfig` fields."""
    return {} if text == "default" else parse_overrides(text.split(","), PretrainConfig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language", required=True)
    parser.add_argument("--workdir", default="runs/pretrain_learns")
    parser.add_argument("--variants", nargs="+", default=["default"], help="key=value[,key=value] or 'default'")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir) / args.language
    corpus = work / "corpus.txt"
    if not corpus.exists():
        write_corpus(args.language, corpus, num=20000, seed=0)
    for variant in args.variants:
        given = parse_variant(variant)
        cfg = PretrainConfig(**{"preset": args.preset, "progress": False, "max_steps": 2000} | given)
        # Named by the resolved rate, so "default" and the rate it stands for share a directory.
        named = [f"lr-{cfg.lr:g}"] + [f"{k}-{v}" for k, v in given.items() if k != "lr"]
        out = work / "_".join([args.preset, *named])
        started = time.time()
        model = pretrain(corpus, out, cfg)
        minutes = (time.time() - started) / 60
        length = fill_length(model, None)
        with torch.no_grad():
            texts = generate(model, make_sampler("sequential"), SamplingConfig(length=length, tokens_per_step=1,
                             seed=1, batch_size=500), num=args.num).texts
        curve = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        held = " ".join(f"{r['step']}:{r['heldout_loss']:.4f}" for r in curve[::max(1, len(curve) // 8)])
        print(json.dumps({"language": args.language, "variant": variant, "lr": cfg.lr, "minutes": round(minutes, 1),
                          "k1_validity": validity_rate(get_language(args.language), texts),
                          "final_heldout": curve[-1]["heldout_loss"], "heldout_curve": held}), flush=True)


if __name__ == "__main__":
    main()
