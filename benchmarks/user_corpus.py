"""The recipe on a corpus file no part of jointdlm knows: balanced brackets (Dyck words), through the CLI's defaults.

A user brings a text file, one document per line, and a way to tell good output from bad; nothing in jointdlm
(no toy-language class, no tuned setting) knows the data. Here the documents are balanced sequences of two
bracket kinds, 6 pairs (12 symbols, 8,448 strings): every closing bracket must match the kind of the latest open
one, a constraint that positions filled independently break. The script writes the corpus, then runs
`jointdlm pretrain`, `trajectories`, `train-adjust` and `sample` with their defaults (only --out and the samplers
chosen), and scores each sample set with its own checker (validity with a 95% Wilson interval).

    python benchmarks/user_corpus.py --workdir runs/dyck [--head-seed 0] [--num 1000] [--pretrain-steps N]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from jointdlm.eval.metrics import proportion

PAIRS = {"(": ")", "[": "]"}


def dyck_word(rng: random.Random, pairs: int) -> str:
    """A uniformly random shape is not needed: a random walk that closes when it must gives every word a chance."""
    out, stack, opened = [], [], 0
    while len(out) < 2 * pairs:
        can_open, can_close = opened < pairs, bool(stack)
        if can_open and (not can_close or rng.random() < 0.5):
            kind = rng.choice(list(PAIRS))
            stack.append(kind)
            out.append(kind)
            opened += 1
        else:
            out.append(PAIRS[stack.pop()])
    return " ".join(out)


def is_valid(text: str, pairs: int) -> bool:
    symbols, stack = text.split(), []
    if len(symbols) != 2 * pairs:
        return False
    for s in symbols:
        if s in PAIRS:
            stack.append(s)
        elif not stack or PAIRS[stack.pop()] != s:
            return False
    return not stack


def write_bracket_corpus(path: Path, pairs: int = 6, docs: int = 20000) -> None:
    """One document per line: `docs` words of `pairs` bracket pairs from one seeded walk."""
    rng = random.Random(0)
    path.write_text("".join(dyck_word(rng, pairs) + "\n" for _ in range(docs)))


def run(argv: list[str]) -> str:
    """Run one CLI command; its last stderr line (the summary), or exit with it."""
    print("$ jointdlm " + " ".join(argv), flush=True)
    done = subprocess.run([sys.executable, "-m", "jointdlm.cli", *argv], stderr=subprocess.PIPE, text=True)
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    if done.returncode != 0:
        raise SystemExit(lines[-1] if lines else f"exit code {done.returncode}")
    return next((line for line in reversed(lines) if "NFE" in line or "warning" in line), lines[-1] if lines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--head-seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: pretrain's own")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    if not corpus.exists():
        write_bracket_corpus(corpus, args.pairs, args.docs)
    model, traj, head = work / "model", work / "trajectories", work / f"head-seed{args.head_seed}"
    if not (model / "training_done.json").exists():
        steps = [] if args.pretrain_steps is None else ["--max-steps", str(args.pretrain_steps)]
        run(["pretrain", "--corpus", str(corpus), "--out", str(model), *steps])
    if not (traj / "manifest.json").exists() or len(list(traj.glob("shard-*.safetensors"))) < 16:
        run(["trajectories", "--model", str(model), "--out", str(traj)])
    if not (head / "adjust_verdict.json").exists():
        run(["train-adjust", "--model", str(model), "--trajectories", str(traj), "--out", str(head),
             "--seed", str(args.head_seed)])
    rows = []
    for spec, k in (("sequential", 1), ("parallel", 4), ("parallel", 8), ("adjust", 4), ("adjust", 8),
                    ("adjust:threshold=0.9", 12), ("threshold:tau=0.5:extra=1", 12), ("eb:gamma=1", 12)):
        out = work / f"samples-{spec.replace(':', '_')}-k{k}-seed{args.head_seed}.jsonl"
        argv = ["sample", "--model", str(model), "--sampler", spec, "--tokens-per-step", str(k), "--num",
                str(args.num), "--seed", "1", "--out", str(out)]
        if spec.startswith("adjust"):
            argv += ["--adjust", str(head)]
        summary = run(argv)
        texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
        est = proportion([is_valid(t, args.pairs) for t in texts])
        passes = float(summary.split("NFE ")[1].split("/")[0]) if "NFE " in summary else None
        rows.append({"sampler": spec, "K": k, "valid": est.value, "low": est.low, "high": est.high,
                     "base_passes": passes, "summary": summary})
        print(f"{spec} K={k}: {est.value:.3f} [{est.low:.3f}, {est.high:.3f}], {passes} base passes", flush=True)
    (work / f"validity-seed{args.head_seed}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
