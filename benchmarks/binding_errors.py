"""What the binding language's invalid samples break (results §2, "Three languages nobody tuned for").

A binding string is `let a be x and b be y ; then a plus b equals a plus b , not c .`: the names a and b must
differ, each must be copied twice, and c must differ from both. For each `jointdlm sample` JSONL file, counts
the samples by the constraints they break: "a==b", "a copy", "b copy", "c in {a,b}" (joined with + when
several), "wrong word class" (a name where a number belongs or the reverse) and "length".

    jointdlm sample --model runs/recipe-bind8k/binding/model --adjust runs/recipe-bind8k/binding/heads/default-seed1 \\
        --sampler adjust:threshold=0.9 --tokens-per-step 8 --num 500 --seed 1 --batch-size 500 --out s1_thr8.jsonl
    python benchmarks/binding_errors.py s1_thr8.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from jointdlm.data import get_language
from jointdlm.data.toy import BINDING_FRAME, BINDING_NAMES, BINDING_NUMBERS

# Word index of each slot of the frame ("let {a} be {x} ...": a is word 1).
SLOTS = {name: [i for i, w in enumerate(BINDING_FRAME.split()) if w == "{" + name + "}"]
         for name in ("a", "b", "c", "x", "y")}


def broken(text: str) -> str:
    """The constraints `text` breaks, or "valid"."""
    if get_language("binding").is_valid(text):
        return "valid"
    words = text.split()
    if len(words) != len(BINDING_FRAME.split()):
        return "length"
    slot = {name: [words[i] for i in where] for name, where in SLOTS.items()}
    names = slot["a"] + slot["b"] + slot["c"]
    if not all(w in BINDING_NAMES for w in names) or not all(w in BINDING_NUMBERS for w in slot["x"] + slot["y"]):
        return "wrong word class"
    a, b, c = slot["a"][0], slot["b"][0], slot["c"][0]
    kinds = [kind for kind, bad in (("a==b", a == b), ("a copy", len(set(slot["a"])) > 1),
                                    ("b copy", len(set(slot["b"])) > 1), ("c in {a,b}", c in (a, b))) if bad]
    return "+".join(kinds) or "frame"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="JSONL files written by `jointdlm sample`")
    args = parser.parse_args()
    for path in args.files:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        counts = collections.Counter(broken(row["text"]) for row in rows)
        copies = sum(n for kind, n in counts.items() if "copy" in kind)
        print(f"{path}: {len(rows)} samples, {counts['valid']} valid, {copies} with a broken copy; "
              + ", ".join(f"{kind} {n}" for kind, n in counts.most_common() if kind != "valid"))


if __name__ == "__main__":
    main()
