"""Is it the head or the sampler around it? Validity with the head's passes replaced (issue #14).

An ADJUST sampler's loss to K=1 has two possible sources: the head's distributions differ from the base's on the
canvases it sees, or the sampler's structure (an opening threshold round, the head's own order of positions, the
candidate set) would lose even with exact distributions. Each `--modes` entry runs the samplers with every head
pass replaced:

* `head`: the head as trained (the sampler as users run it);
* `base`: a full base pass on the same canvas, read at the same candidates: the best any head could do in this
  sampler (what is left below K=1 is the sampler's);
* `ensemble:DIR`: the mean of this head's and another head's log-probabilities (e.g. another training seed): an
  error that averaging removes is the seed's, one that stays is the recipe's;
* `scale:F`: the head's logits times F (F > 1 sharpens): whether the head is systematically too flat or too sharp.

    python benchmarks/head_precision.py --model runs/demo/template/model --adjust runs/tpl6k/s0 \
        --samplers adjust:threshold=0.9:16,adjust:4 --modes head,base,ensemble:runs/tpl6k/s1,scale:1.05 --seeds 1,2,3,4
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from jointdlm.adjust.head import AdjustHead, StepPasses
from jointdlm.data.toy import TEMPLATE_FRAME, get_language
from jointdlm.eval.metrics import proportion
from jointdlm.models.mdlm import BuiltinModel, take_positions
from jointdlm.sampling.loop import SamplingConfig, fill_length, generate
from jointdlm.sampling.registry import make_from_spec

try:
    from template_errors import error_kind, template_owner
except ImportError:  # run from elsewhere than benchmarks/
    from benchmarks.template_errors import error_kind, template_owner


class ReplacedPasses:
    """Installs `mode` in place of `StepPasses.logits` for the duration of a `with` block (an ensemble's second head
    follows the candidates the first keeps and takes in)."""

    def __init__(self, mode: str, model: BuiltinModel) -> None:
        self.mode, self.model, self.original = mode, model, StepPasses.logits
        self.other: AdjustHead | None = None
        if mode.startswith("ensemble:"):
            self.other = AdjustHead.from_pretrained(mode.split(":", 1)[1], model)
        elif mode.startswith("scale:"):
            self.factor = float(mode.split(":", 1)[1])
        elif mode not in ("head", "base"):
            raise ValueError(f"unknown mode {mode!r}: give head, base, ensemble:DIR or scale:F")

    def __enter__(self) -> None:
        original, other, mode = self.original, self.other, self.mode

        def base_pass(passes: StepPasses, tokens: torch.Tensor, written: torch.Tensor | None = None) -> torch.Tensor:
            return take_positions(passes.base.forward(tokens, passes.attention_mask).logits, passes.index)

        def ensemble(passes: StepPasses, tokens: torch.Tensor, written: torch.Tensor | None = None) -> torch.Tensor:
            if not hasattr(passes, "twin"):  # the other head's passes over the same step, narrowed alike
                passes.twin = StepPasses(other, passes.base, passes.attention_mask, passes.base_hidden, passes.index)
            mine = original(passes, tokens, written).log_softmax(-1)
            return (mine + original(passes.twin, tokens, written).log_softmax(-1)) / 2

        def scaled(passes: StepPasses, tokens: torch.Tensor, written: torch.Tensor | None = None) -> torch.Tensor:
            return original(passes, tokens, written) * self.factor

        def keep(passes: StepPasses, columns: torch.Tensor) -> None:
            keep_original(passes, columns)
            if hasattr(passes, "twin"):
                keep_original(passes.twin, columns)

        def replace(passes: StepPasses, column: torch.Tensor, position: torch.Tensor) -> None:
            replace_original(passes, column, position)
            if hasattr(passes, "twin"):
                replace_original(passes.twin, column, position)

        keep_original, replace_original = StepPasses.keep, StepPasses.replace
        self.keep_original, self.replace_original = keep_original, replace_original
        if mode == "base":
            StepPasses.logits = base_pass
        elif mode.startswith("ensemble:"):
            StepPasses.logits, StepPasses.keep, StepPasses.replace = ensemble, keep, replace
        elif mode.startswith("scale:"):
            StepPasses.logits = scaled

    def __exit__(self, *exc: object) -> None:
        StepPasses.logits, StepPasses.keep, StepPasses.replace = self.original, self.keep_original, \
            self.replace_original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a built-in base")
    parser.add_argument("--adjust", required=True, help="ADJUST head directory")
    parser.add_argument("--language", default="template")
    parser.add_argument("--samplers", required=True,
                        help="comma-separated SPEC:K, an ADJUST spec then its tokens per step (its cap if adaptive)")
    parser.add_argument("--modes", default="head,base", help="comma-separated: head, base, ensemble:DIR, scale:F")
    parser.add_argument("--num", type=int, default=3000, help="samples per sampler, mode and seed")
    parser.add_argument("--seeds", default="1", help="comma-separated sampling seeds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        rows = [(spec.rpartition(":")[0], int(spec.rpartition(":")[2])) for spec in args.samplers.split(",")]
        if any(not spec.startswith("adjust") for spec, _ in rows):
            raise ValueError("--samplers must be ADJUST specs (the check replaces their head passes)")
        seeds = [int(s) for s in args.seeds.split(",")]
        language = get_language(args.language)
        model = BuiltinModel.load(args.model)
        head = AdjustHead.from_pretrained(args.adjust, model)
        modes = [ReplacedPasses(mode, model) for mode in args.modes.split(",")]
    except (OSError, ValueError) as err:
        parser.exit(2, f"head_precision.py: error: {err}\n")
    kinds_of = None
    if args.language == "template":
        owner = template_owner()
        frame = TEMPLATE_FRAME.split()

        def kinds_of(texts: list[str]) -> Counter[str]:
            return Counter(k for k in (error_kind(t, owner, frame) for t in texts) if k is not None)

    print("| head passes | sampler | K | samples | invalid | validity [95% interval] | errors by kind |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        for spec, k in rows:
            sampler = make_from_spec(spec, head=head)
            valid, kinds = [], Counter()
            with mode:
                for seed in seeds:
                    config = SamplingConfig(length=fill_length(model, None), tokens_per_step=k, seed=seed,
                                            batch_size=500)
                    with torch.no_grad():
                        texts = generate(model, sampler, config, num=args.num).texts
                    valid += [language.is_valid(t) for t in texts]
                    kinds += kinds_of(texts) if kinds_of else Counter()
            est = proportion(valid)
            print(f"| {mode.mode} | {spec} | {k} | {len(valid)} | {len(valid) - sum(valid)} | "
                  f"{est.value:.4f} [{est.low:.3f}, {est.high:.3f}] | {dict(sorted(kinds.items())) or '–'} |",
                  flush=True)


if __name__ == "__main__":
    main()
