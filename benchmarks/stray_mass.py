"""Where ADJUST loses template validity: the head's probability on words of another subject (issue #14).

A template sample is invalid when one content word belongs to another subject than the rest, so the probability
a distribution puts on such words is the error ADJUST can add over K=1. This samples with an ADJUST sampler and,
at every head pass, compares the head's distributions at the positions it computes with the base's exact
distributions on the same canvas: the mean mass each puts on words of a subject other than the one most of the
written content words belong to, by how many content words are written.

    python benchmarks/stray_mass.py --model runs/demo/template/model --adjust runs/r8/thr_tpl_s1 \
        --sampler adjust:threshold=0.9 --tokens-per-step 16 --num 1000
"""

from __future__ import annotations

import argparse

import torch

from jointdlm.adjust.head import AdjustHead
from jointdlm.data.toy import get_language
from jointdlm.models.mdlm import BuiltinModel, take_positions
from jointdlm.sampling.loop import SamplingConfig, fill_length, generate
from jointdlm.sampling.registry import make_from_spec


def subject_of_token(model: BuiltinModel) -> torch.Tensor:
    """(V,) the index of the subject whose word each token is, -1 for frame words and other tokens."""
    owner = {}
    for i, subject in enumerate(get_language("template").subjects):
        for word in (subject.word, subject.home, *(w for pair in subject.slots for w in pair)):
            ids = model.tokenizer.encode(" " + word)  # content words never open a sentence
            if len(ids) != 1:
                raise ValueError(f"template word {word!r} is {len(ids)} tokens; this check needs one per word")
            owner[ids[0]] = i
    table = torch.full((model.spec.vocab_size,), -1, dtype=torch.long)
    table[list(owner)] = torch.tensor(list(owner.values()))
    return table


class LoggingHead:
    """The head as the sampler uses it, plus the base's exact logits at the same positions and canvas."""

    def __init__(self, head: AdjustHead, subject: torch.Tensor) -> None:
        self.head, self.subject = head, subject
        self.sums: dict[int, list[float]] = {}

    def __getattr__(self, name: str):
        return getattr(self.head, name)

    def step_passes(self, base, attention_mask, hidden, index):
        passes = self.head.step_passes(base, attention_mask, hidden, index)
        head_logits = passes.logits

        def logged(tokens, written=None):
            logits = head_logits(tokens, written)  # (B, C, V) at passes.index
            self.log(base, tokens, attention_mask, passes.index, logits)
            return logits

        passes.logits = logged
        return passes

    def log(self, base, tokens, attention_mask, index, logits) -> None:
        exact = take_positions(base.forward(tokens, attention_mask).logits, index)
        # The candidates still to be chosen among, each once (a row with fewer repeats its first).
        here = take_positions(tokens, index) == base.spec.mask_id
        here[:, 1:] &= index[:, 1:] != index[:, :1]
        written = self.subject[tokens]  # (B, T)
        for b in range(tokens.shape[0]):
            mine = written[b][written[b] >= 0]
            if mine.numel() == 0 or not here[b].any():
                continue
            majority = int(torch.mode(mine).values)
            stray = (self.subject >= 0) & (self.subject != majority)
            entry = self.sums.setdefault(int(mine.numel()), [0, 0.0, 0.0])
            entry[0] += int(here[b].sum())
            entry[1] += float(logits[b][here[b]].softmax(-1)[:, stray].sum())
            entry[2] += float(exact[b][here[b]].softmax(-1)[:, stray].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a built-in base trained on the template language")
    parser.add_argument("--adjust", required=True, help="ADJUST head directory")
    parser.add_argument("--sampler", default="adjust:threshold=0.9")
    parser.add_argument("--tokens-per-step", type=int, default=16)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not args.sampler.startswith("adjust"):
        parser.error("--sampler must be an ADJUST spec (the check reads its head passes)")
    torch.set_num_threads(args.threads)
    try:
        model = BuiltinModel.load(args.model)
        logging_head = LoggingHead(AdjustHead.from_pretrained(args.adjust, model), subject_of_token(model))
        sampler = make_from_spec(args.sampler, head=logging_head.head)
    except (OSError, ValueError) as err:
        parser.exit(2, f"stray_mass.py: error: {err}\n")
    sampler.head = logging_head
    config = SamplingConfig(length=fill_length(model, None), tokens_per_step=args.tokens_per_step, seed=args.seed,
                            batch_size=500)
    with torch.no_grad():
        texts = generate(model, sampler, config, num=args.num).texts
    valid = sum(get_language("template").is_valid(t) for t in texts) / len(texts)
    print(f"{args.sampler} K={args.tokens_per_step}: validity {valid:.4f} over {len(texts)} samples")
    print("| content words written | positions | head: mass on another subject's words | base (exact) |")
    print("|---|---|---|---|")
    for written, (n, head_mass, exact_mass) in sorted(logging_head.sums.items()):
        print(f"| {written} | {n} | {head_mass / n:.5f} | {exact_mass / n:.5f} |")


if __name__ == "__main__":
    main()
