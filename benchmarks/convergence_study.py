"""Does `jointdlm pretrain`'s convergence warning see the bases that more steps would improve?

For each corpus (toy languages through `jointdlm corpus`, and the balanced-bracket corpus of `user_corpus.py`,
which no part of jointdlm knows), pre-train a base with the CLI's defaults at the default step count and at three
times it, each from scratch; log the held-out loss curve of each run, the warning `pretrain` printed, and K=1
validity of 500 samples. A base the warning passes should not gain much from the longer run.

    python benchmarks/convergence_study.py --workdir runs/convergence [--languages choice,brackets] [--steps 2000,6000]
        [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jointdlm.data.toy import get_language
from jointdlm.eval.metrics import proportion
from jointdlm.models.train import last_quarter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_corpus import is_valid, run, write_bracket_corpus  # noqa: E402

BRACKET_PAIRS = 6


def write_corpus(name: str, path: Path) -> None:
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "brackets":  # as user_corpus.py writes it
        write_bracket_corpus(path, BRACKET_PAIRS)
    else:
        run(["corpus", name, "--out", str(path)])


def validity(name: str, samples: Path) -> list[bool]:
    texts = [json.loads(line)["text"] for line in samples.read_text().splitlines() if line.strip()]
    if name == "brackets":
        return [is_valid(t, BRACKET_PAIRS) for t in texts]
    lang = get_language(name)
    return [lang.is_valid(t) for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--languages", default="choice,permutation,binding,seating,brackets")
    parser.add_argument("--steps", default="2000,6000")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="pre-training seed (samples: seed 1)")
    parser.add_argument("--report", action="store_true", help="only print the table of every run so far")
    args = parser.parse_args()
    work = Path(args.workdir)
    study = work / "study.json"  # rows of earlier calls are kept, a repeated (language, steps, seed) replaced
    results = json.loads(study.read_text()) if study.is_file() else []
    if args.report:
        report(results)
        return
    for name in args.languages.split(","):
        corpus = work / name / "corpus.txt"
        write_corpus(name, corpus)
        for steps in (int(s) for s in args.steps.split(",")):
            tag = f"s{steps}" + (f"_seed{args.seed}" if args.seed else "")
            model = work / name / tag
            said = run(["pretrain", "--corpus", str(corpus), "--out", str(model), "--max-steps", str(steps),
                        "--seed", str(args.seed)])  # the warning line, if pretrain printed one
            warning = said if said.startswith("warning: held-out loss") else None
            samples = work / name / f"{tag}_k1.jsonl"
            if not samples.is_file():
                run(["sample", "--model", str(model), "--sampler", "sequential", "--num", str(args.num),
                     "--seed", "1", "--out", str(samples)])
            rate = proportion(validity(name, samples))
            log = [json.loads(line) for line in (model / "train_log.jsonl").read_text().splitlines() if line.strip()]
            curve = [(r["step"], r["heldout_loss"]) for r in log if r.get("heldout_loss") is not None]
            row = {"language": name, "steps": steps, "seed": args.seed, "k1_validity": round(rate.value, 4),
                   "interval": [round(rate.low, 4), round(rate.high, 4)],
                   "warning": warning, "heldout": curve}
            results = [r for r in results if (r["language"], r["steps"], r.get("seed", 0)) != (name, steps, args.seed)]
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "heldout"}), flush=True)
            study.write_text(json.dumps(results, indent=1))
    report(results)


def report(results: list[dict]) -> None:
    """One markdown row per run: validity, the last held-out loss, its move over the last quarter (what the
    warning reads), and whether `pretrain` warned."""
    print("| corpus | seed | steps | K=1 validity [95%] | held-out loss | over the last quarter | warned |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["language"], r.get("seed", 0), r["steps"])):
        (_, before), (_, last) = last_quarter([tuple(point) for point in r["heldout"]])
        low, high = r["interval"]
        moved = (last - before) / before
        print(f"| {r['language']} | {r.get('seed', 0)} | {r['steps']:,} | {r['k1_validity']:.3f} "
              f"[{low:.3f}, {high:.3f}] | {last:.4f} | {moved:+.1%} | {'yes' if r['warning'] else 'no'} |")


if __name__ == "__main__":
    main()
