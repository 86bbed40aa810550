"""What makes template samples invalid, sampler by sampler, over several sampling seeds (issue #14).

A template sample is invalid when its content words belong to two subjects (`mixN`: N words of a subject other
than the majority's), when a content word of the right subject sits in the wrong slot (`mix0`), when a frame word
is wrong (`frame`), when a word is no template word (`nonword`) or when the sentence has the wrong length. Each
sampler writes `--num` samples per seed; the summary pools the seeds, with a Wilson 95% interval. For the samples
with one stray word (`mix1`) it also gives when that word was written: how many content words were written before
it (read off the canvases the base's and the head's passes see), so that K=1's errors and ADJUST's can be compared
by depth.

    python benchmarks/template_errors.py --model runs/demo/template/model --adjust runs/tpl6k/s0 \
        --samplers sequential:1,threshold:tau=0.5:extra=1:2,adjust:threshold=0.9:16 --seeds 1,2,3
"""

from __future__ import annotations

import argparse
from collections import Counter
from itertools import pairwise

import torch

from jointdlm.adjust.head import AdjustHead, StepPasses
from jointdlm.data.toy import TEMPLATE_FRAME, get_language, normalize
from jointdlm.eval.metrics import proportion
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.sampling.loop import SamplingConfig, fill_length, generate
from jointdlm.sampling.registry import make_from_spec


def template_owner() -> dict[str, str]:
    """Each template word of a subject (its name, home and slot words) -> that subject's name."""
    return {w: s.word for s in get_language("template").subjects
            for w in (s.word, s.home, *(w for p in s.slots for w in p))}


def error_kind(text: str, owner: dict[str, str], frame: list[str]) -> str | None:
    """None for a valid sample, else the kind of its first error (see the module's docstring)."""
    if get_language("template").is_valid(text):
        return None
    words = normalize(text).split()
    if len(words) != len(frame):
        return "length"
    if any(w != f for w, f in zip(words, frame, strict=True) if not f.startswith("{")):
        return "frame"
    content = [w for w, f in zip(words, frame, strict=True) if f.startswith("{")]
    if any(w not in owner for w in content):
        return "nonword"
    subjects = Counter(owner[w] for w in content)
    majority = subjects.most_common(1)[0][0]
    return f"mix{sum(owner[w] != majority for w in content)}"


class Canvases:
    """Every canvas a base pass or a head pass sees during sampling (the write order is read off them)."""

    def __init__(self, model: BuiltinModel) -> None:
        self.seen: list[torch.Tensor] = []
        forward, logits = model.forward, StepPasses.logits

        def base_pass(tokens, *args, **kwargs):
            self.seen.append(tokens.clone())
            return forward(tokens, *args, **kwargs)

        def head_pass(passes, tokens, written=None):
            self.seen.append(tokens.clone())
            return logits(passes, tokens, written)

        model.forward = base_pass
        StepPasses.logits = head_pass

    def stray_ranks(self, tokens: list[list[int]], length: int, mask_id: int, batch_size: int,
                    owner_of_id: dict[int, str]) -> Counter[int] | None:
        """For each sample with exactly one stray content word: how many content words were written before it.
        None for a sampler whose passes leave out rows that are done (adaptive steps): rows cannot be told apart."""
        if len({c.shape for c in self.seen}) > 1:
            self.seen.clear()
            return None
        ranks: Counter[int] = Counter()
        # A batch's first pass sees every generated position masked: that is where the next batch's canvases start.
        starts = [i for i, c in enumerate(self.seen) if bool(((c == mask_id).sum(-1) == length).all())]
        starts.append(len(self.seen))
        for b, (first, end) in enumerate(pairwise(starts)):
            canvases = torch.stack(self.seen[first:end])  # (passes, rows, T)
            written_at = torch.where((canvases != mask_id).any(0), (canvases != mask_id).float().argmax(0),
                                     len(canvases))  # (rows, T): the pass that first saw the position written
            for row in range(canvases.shape[1]):
                final = tokens[b * batch_size + row]
                offset = canvases.shape[2] - length  # a prefix (BOS) before the generated tokens
                content = [(int(written_at[row, offset + p]), owner_of_id[t]) for p, t in enumerate(final)
                           if t in owner_of_id]
                subjects = Counter(s for _, s in content)
                if len(content) != 10 or len(subjects) != 2 or min(subjects.values()) != 1:
                    continue
                stray = min(subjects, key=subjects.get)
                when = next(w for w, s in content if s == stray)
                ranks[sum(w < when for w, _ in content)] += 1
        self.seen.clear()
        return ranks


def _ranks(ranks: Counter[int] | None) -> str:
    return "–" if ranks is None else str(dict(sorted(ranks.items())))


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
    owner = template_owner()
    frame = TEMPLATE_FRAME.split()
    try:
        rows = [(spec.rpartition(":")[0], int(spec.rpartition(":")[2])) for spec in args.samplers.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        model = BuiltinModel.load(args.model)
        owner_of_id = {}
        for word, subject in owner.items():
            ids = model.tokenizer.encode(" " + word)  # content words never open a sentence
            if len(ids) != 1:
                raise ValueError(f"template word {word!r} is {len(ids)} tokens; this check needs one per word")
            owner_of_id[ids[0]] = subject
        canvases = Canvases(model)
        head = AdjustHead.from_pretrained(args.adjust, model) if args.adjust else None
        samplers = [make_from_spec(spec, head=head) if spec.startswith("adjust") else make_from_spec(spec)
                    for spec, _ in rows]
    except (OSError, ValueError) as err:
        parser.exit(2, f"template_errors.py: error: {err}\n")
    print("| sampler | K | seed | samples | invalid | validity [95% interval] | errors by kind | one stray word: "
          "content words written before it |")
    print("|---|---|---|---|---|---|---|---|")
    for (spec, k), sampler in zip(rows, samplers, strict=True):
        pooled: Counter[str] = Counter()
        pooled_ranks: Counter[int] | None = Counter()
        for seed in seeds:
            config = SamplingConfig(length=fill_length(model, None), tokens_per_step=k, seed=seed, batch_size=500)
            with torch.no_grad():
                out = generate(model, sampler, config, num=args.num)
            texts = out.texts
            ranks = canvases.stray_ranks(out.tokens, config.length, model.spec.mask_id, config.batch_size, owner_of_id)
            pooled_ranks = None if ranks is None or pooled_ranks is None else pooled_ranks + ranks
            kinds = Counter(kind for kind in (error_kind(t, owner, frame) for t in texts) if kind is not None)
            pooled += kinds
            bad = sum(kinds.values())
            est = proportion([True] * (args.num - bad) + [False] * bad)
            print(f"| {spec} | {k} | {seed} | {args.num} | {bad} | {est.value:.4f} [{est.low:.3f}, {est.high:.3f}] "
                  f"| {dict(sorted(kinds.items()))} | {_ranks(ranks)} |", flush=True)
        n, bad = args.num * len(seeds), sum(pooled.values())
        est = proportion([True] * (n - bad) + [False] * bad)
        print(f"| **{spec}** | {k} | pooled | {n} | {bad} | **{est.value:.4f} [{est.low:.3f}, {est.high:.3f}]** "
              f"| {dict(sorted(pooled.items()))} | {_ranks(pooled_ranks)} |", flush=True)


if __name__ == "__main__":
    main()
