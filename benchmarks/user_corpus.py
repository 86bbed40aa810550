"""The recipe on a corpus file no part of jointdlm knows, through the CLI's defaults.

A user brings a text file, one document per line, and a way to tell good output from bad; nothing in jointdlm
(no toy-language class, no tuned setting) knows the data. Two kinds of corpus:

* `--kind brackets` (default): balanced sequences of two bracket kinds, 6 pairs (12 symbols, 8,448 strings):
  every closing bracket must match the kind of the latest open one, a constraint that positions filled
  independently break.
* `--kind permutation`: the same ten words in a random order, comma-separated (`--size` words, 19 words at 10):
  every word excludes itself from every other slot, a chain of dependence as long as the list, so a sampler
  that fills several uncertain slots from one pass repeats a word.
* `--kind chain`: a chain of choices, `--size` words (12 by default) of the same twelve, comma-separated: the
  first any of them, each next one of the two the one before allows (word i: words 2i and 2i + 1, mod 12). A
  word leaves its neighbours two choices and the words two apart four, so a sampler that fills two nearby open
  slots from one pass pairs words no rule joins.

The script writes the corpus, then runs `jointdlm pretrain`, `trajectories`, `train-adjust` and `sample` with
their defaults (only --out, the seeds and the samplers chosen), and scores each sample set with its own checker
(validity with a 95% Wilson interval) beside its base passes per sample.

    python benchmarks/user_corpus.py --workdir runs/dyck [--head-seed 0] [--num 1000] [--pretrain-steps N]
    python benchmarks/user_corpus.py --workdir runs/perm10 --kind permutation [--base-seed 1]
    python benchmarks/user_corpus.py --workdir runs/chain12 --kind chain [--head-seed 1]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from jointdlm.eval.metrics import proportion
from jointdlm.models.mdlm import read_config

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


PERMUTATION_WORDS = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "kiwi", "lynx")
CHAIN_NEXT = {w: (PERMUTATION_WORDS[2 * i % 12], PERMUTATION_WORDS[(2 * i + 1) % 12])
              for i, w in enumerate(PERMUTATION_WORDS)}
"""The two words that may follow each word of a chain: every word has two successors and two predecessors, so
every slot of a chain with a uniform first word is uniform over the twelve."""


def is_permutation(text: str, size: int) -> bool:
    """Whether `text` lists the first `size` words of PERMUTATION_WORDS, each once, comma-separated."""
    words = text.split()
    return words[1::2] == [","] * (size - 1) and sorted(words[::2]) == sorted(PERMUTATION_WORDS[:size])


def write_permutation_corpus(path: Path, size: int = 10, docs: int = 20000) -> None:
    """One document per line: the first `size` words in a random order, from one seeded generator."""
    rng, words = random.Random(0), list(PERMUTATION_WORDS[:size])
    lines = []
    for _ in range(docs):
        rng.shuffle(words)
        lines.append(" , ".join(words) + "\n")
    path.write_text("".join(lines))


def is_chain(text: str, size: int) -> bool:
    """Whether `text` is `size` words of the chain, comma-separated, each one the one before allows."""
    words = text.split()
    chain = words[::2]
    return (words[1::2] == [","] * (size - 1) and len(chain) == size and chain[0] in CHAIN_NEXT
            and all(b in CHAIN_NEXT.get(a, ()) for a, b in zip(chain[:-1], chain[1:], strict=True)))


def write_chain_corpus(path: Path, size: int = 12, docs: int = 20000) -> None:
    """One document per line: a uniform first word, then each next word uniform over the two allowed."""
    rng = random.Random(0)
    lines = []
    for _ in range(docs):
        chain = [rng.choice(PERMUTATION_WORDS)]
        while len(chain) < size:
            chain.append(rng.choice(CHAIN_NEXT[chain[-1]]))
        lines.append(" , ".join(chain) + "\n")
    path.write_text("".join(lines))


def write_bracket_corpus(path: Path, pairs: int = 6, docs: int = 20000) -> None:
    """One document per line: `docs` words of `pairs` bracket pairs from one seeded walk."""
    rng = random.Random(0)
    path.write_text("".join(dyck_word(rng, pairs) + "\n" for _ in range(docs)))


class Kind(NamedTuple):
    test: Callable[[str, int], bool]
    write: Callable[[Path, int, int], None]
    default_size: int
    max_size: int


KINDS = {"brackets": Kind(is_valid, write_bracket_corpus, 6, 63),
         "permutation": Kind(is_permutation, write_permutation_corpus, 10, len(PERMUTATION_WORDS)),
         "chain": Kind(is_chain, write_chain_corpus, 12, 63)}


def checker(kind: str, size: int) -> Callable[[str], bool]:
    """The validity test of a corpus kind, bound to its size here, so nothing later in `main` can change it."""
    test = KINDS[kind].test
    return lambda text: test(text, size)


ROWS = (("sequential", 1), ("parallel", 4), ("parallel", 6), ("parallel", 8), ("adjust", 4), ("adjust", 8),
        ("adjust:threshold=0.9", 12), ("adjust:threshold=0.9", 16), ("threshold:tau=0.5:extra=1", None),
        ("eb:gamma=1", None), ("threshold:tau=0.9:extra=1", None), ("threshold:tau=0.3", None),
        ("eb:gamma=2", None), ("eb:gamma=3", None), ("eb:gamma=4", None), ("punt:epsilon=0.1", None),
        ("punt:epsilon=0.5", None), ("punt:epsilon=2", None))
"""The samplers and K each run scores (K None: the sampler sizes its own steps)."""


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
    parser.add_argument("--kind", choices=tuple(KINDS), default="brackets")
    parser.add_argument("--size", "--pairs", dest="size", type=int, default=None,
                        help="bracket pairs (default 6), words in the permutation (default 10, at most "
                             f"{len(PERMUTATION_WORDS)}) or in the chain (default 12)")
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--head-seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: pretrain's own")
    parser.add_argument("--base-seed", type=int, default=0, help="pretrain's --seed (a second base: a new --workdir)")
    args = parser.parse_args()
    kind = KINDS[args.kind]
    size = args.size if args.size is not None else kind.default_size
    if not 2 <= size <= kind.max_size:
        parser.error(f"--size {size} is out of range for --kind {args.kind}")
    valid = checker(args.kind, size)
    work = args.workdir
    model, traj, head = work / "model", work / "trajectories", work / f"head-seed{args.head_seed}"
    if (model / "config.json").exists():  # checked before anything is written into the workdir
        seed = (read_config(model / "config.json").get("pretrain") or {}).get("seed")
        if seed != args.base_seed:
            parser.error(f"{model} was pre-trained with seed {seed}, not --base-seed {args.base_seed}; use a new "
                         "--workdir")
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    if not corpus.exists():
        kind.write(corpus, size, args.docs)
    with open(corpus) as f:
        if not valid(f.readline().strip()):  # a workdir of another kind or size: its samples would be misjudged
            parser.error(f"{corpus} is not a --kind {args.kind} corpus of size {size}; use a new --workdir")
    if not (model / "training_done.json").exists():
        steps = [] if args.pretrain_steps is None else ["--max-steps", str(args.pretrain_steps)]
        run(["pretrain", "--corpus", str(corpus), "--out", str(model), *steps, "--seed", str(args.base_seed)])
    if not (traj / "manifest.json").exists() or len(list(traj.glob("shard-*.safetensors"))) < 16:
        run(["trajectories", "--model", str(model), "--out", str(traj)])
    if not (head / "adjust_verdict.json").exists():
        run(["train-adjust", "--model", str(model), "--trajectories", str(traj), "--out", str(head),
             "--seed", str(args.head_seed)])
    rows = []
    for spec, k in ROWS:
        schedule = [] if k is None else ["--tokens-per-step", str(k)]
        out = work / f"samples-{spec.replace(':', '_')}{'' if k is None else f'-k{k}'}-seed{args.head_seed}.jsonl"
        argv = ["sample", "--model", str(model), "--sampler", spec, *schedule, "--num",
                str(args.num), "--seed", "1", "--out", str(out)]
        if spec.startswith("adjust"):
            argv += ["--adjust", str(head)]
        summary = run(argv)
        texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
        est = proportion([valid(t) for t in texts])
        passes = float(summary.split("NFE ")[1].split("/")[0]) if "NFE " in summary else None
        rows.append({"sampler": spec, "K": k, "valid": est.value, "low": est.low, "high": est.high,
                     "base_passes": passes, "summary": summary})
        label = "adaptive" if k is None else f"K={k}"
        print(f"{spec} {label}: {est.value:.3f} [{est.low:.3f}, {est.high:.3f}], {passes} base passes", flush=True)
    (work / f"validity-seed{args.head_seed}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
