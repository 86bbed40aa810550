"""What makes template samples invalid, sampler by sampler, over several sampling seeds (issue #14).

A template sample is invalid when its content words belong to two subjects (`mixN`: N words of a subject other
than the majority's), when a content word of the right subject sits in the wrong slot (`mix0`), when a frame word
is wrong (`frame`), when a word is no template word (`nonword`) or when the sentence has the wrong length. Each
sampler writes `--num` samples per seed; the summary pools the seeds, with a Wilson 95% interval.

    python benchmarks/template_errors.py --model runs/demo/template/model --adjust runs/tpl6k/s0 \
        --samplers sequential:1,threshold:tau=0.5:extra=1:2,adjust:threshold=0.9:16 --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

import torch

from jointdlm.adjust.head import AdjustHead
from jointdlm.data.toy import TEMPLATE_FRAME, get_language, normalize
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.sampling.loop import SamplingConfig, fill_length, generate
from jointdlm.sampling.registry import make_from_spec


def error_kind(text: str, owner: dict[str, str], frame: list[str]) -> str | None:
    """None for a valid sample, else the kind of its first error (see the module's docstring)."""
    if get_language("template").is_valid(text):
        return None
    words = normalize(text).split()
    if len(words) != len(frame):
        return "length"
    if any(w != f for w, f in zip(words, frame) if not f.startswith("{")):
        return "frame"
    content = [w for w, f in zip(words, frame) if f.startswith("{")]
    if any(w not in owner for w in content):
        return "nonword"
    subjects = Counter(owner[w] for w in content)
    majority = subjects.most_common(1)[0][0]
    return f"mix{sum(owner[w] != majority for w in content)}"


def wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.96
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a built-in base trained on the template language")
    parser.add_argument("--adjust", help="ADJUST head directory (needed by adjust samplers)")
    parser.add_argument("--samplers", required=True,
                        help="comma-separated SPEC:K, the sampler spec then its tokens per step (its cap if adaptive)")
    parser.add_argument("--num", type=int, default=3000, help="samples per sampler and seed")
    parser.add_argument("--seeds", default="1", help="comma-separated sampling seeds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    language = get_language("template")
    owner = {w: s.word for s in language.subjects for w in (s.word, s.home, *(w for p in s.slots for w in p))}
    frame = TEMPLATE_FRAME.split()
    try:
        rows = [(spec.rpartition(":")[0], int(spec.rpartition(":")[2])) for spec in args.samplers.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        model = BuiltinModel.load(args.model)
        head = AdjustHead.from_pretrained(args.adjust, model) if args.adjust else None
        samplers = [make_from_spec(spec, head=head) if spec.startswith("adjust") else make_from_spec(spec)
                    for spec, _ in rows]
    except (OSError, ValueError) as err:
        parser.exit(2, f"template_errors.py: error: {err}\n")
    print("| sampler | K | seed | samples | invalid | validity [95% interval] | errors by kind |")
    print("|---|---|---|---|---|---|---|")
    for (spec, k), sampler in zip(rows, samplers):
        pooled: Counter[str] = Counter()
        for seed in seeds:
            config = SamplingConfig(length=fill_length(model, None), tokens_per_step=k, seed=seed, batch_size=500)
            with torch.no_grad():
                texts = generate(model, sampler, config, num=args.num).texts
            kinds = Counter(kind for kind in (error_kind(t, owner, frame) for t in texts) if kind is not None)
            pooled += kinds
            bad = sum(kinds.values())
            low, high = wilson(args.num - bad, args.num)
            print(f"| {spec} | {k} | {seed} | {args.num} | {bad} | {1 - bad / args.num:.4f} [{low:.3f}, {high:.3f}] "
                  f"| {dict(sorted(kinds.items()))} |", flush=True)
        n, bad = args.num * len(seeds), sum(pooled.values())
        low, high = wilson(n - bad, n)
        print(f"| **{spec}** | {k} | pooled | {n} | {bad} | **{1 - bad / n:.4f} [{low:.3f}, {high:.3f}]** "
              f"| {dict(sorted(pooled.items()))} |", flush=True)


if __name__ == "__main__":
    main()
