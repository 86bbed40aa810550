"""Adaptive Parallel Decoding: draft left to right from the marginals, keep what a causal LM agrees with.

One base pass gives the marginals p_D of the leftmost `max_draft` masked positions; a draft is drawn from
them. One causal-scorer pass over the canvas with the draft written in gives p_AR at each drafted position,
conditioned on the true prefix and the drafted tokens before it. The target is p_T ∝ p_D^R · p_AR^(1-R).
Its token at each position is drawn with the same uniform as the draft (same step seed, position and stream,
inverted through each one's cumulative distribution), so draft and target coincide wherever the two
distributions agree closely. The longest agreeing
prefix is accepted and the first disagreeing position takes the target's token, so every step writes at
least one token and every written token is the target's. R = 1 makes the target the draft (everything
accepted); R = 0 is the causal model alone. The unmasking rule is not used: APD is left to right by
construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..models.causal import CausalScorer
from ..validation import require_finite
from .base import StepContext, StepResult, resolve_config
from .edlm import check_vocabulary
from .rules import Marginals, model_logprobs


@dataclass(frozen=True)
class APDConfig:
    mixture_weight: float = 0.5
    max_draft: int = 16

    def __post_init__(self) -> None:
        require_finite(self, ("mixture_weight",))
        if not (0 <= self.mixture_weight <= 1):
            raise ValueError(f"mixture_weight must be in [0, 1], got {self.mixture_weight}")
        if isinstance(self.max_draft, bool) or not isinstance(self.max_draft, int) or self.max_draft < 1:
            raise ValueError(f"max_draft must be an integer >= 1, got {self.max_draft!r}")


class APDSampler:
    name = "apd"
    follows_budget = False

    def __init__(self, config: APDConfig | None = None, *, scorer: CausalScorer, **settings: Any) -> None:
        self.config = resolve_config(APDConfig, config, settings)
        self.scorer = scorer

    def step(self, ctx: StepContext) -> StepResult:
        check_vocabulary(self.scorer, ctx)
        lp_draft = ctx.logprobs(ctx.forward().logits)
        drafted = ctx.eligible & (ctx.eligible.long().cumsum(-1) <= self.config.max_draft)
        draft = ctx.sample(lp_draft, drafted)
        canvas = torch.where(drafted, draft, ctx.tokens)
        check_prefix(canvas, ctx.attention_mask, drafted, ctx.model.spec.mask_id)
        next_lp = self.scorer.next_token_logprobs(canvas.to(self.scorer.device),
                                                  ctx.attention_mask.to(self.scorer.device)).to(lp_draft.values.device)
        aligned = torch.cat([next_lp[:, :1], next_lp[:, :-1]], dim=1)
        lp_causal = model_logprobs(aligned[drafted], ctx.model.spec.never_sampled())
        target_lp = mixture(lp_draft.at(drafted), lp_causal, self.config.mixture_weight)
        target = ctx.sample(Marginals(drafted, target_lp), drafted)
        disagree = (drafted & (target != draft)).long()
        fill = drafted & (disagree.cumsum(-1) - disagree == 0)
        return StepResult(fill=fill, tokens=target, base_passes=1, extra_passes=1)


def mixture(lp_draft: torch.Tensor, lp_causal: torch.Tensor, weight: float) -> torch.Tensor:
    """log p_T with p_T ∝ p_D^weight · p_AR^(1 - weight); the endpoints avoid 0 · (-inf)."""
    if weight == 1:
        return lp_draft
    if weight == 0:
        return lp_causal
    return torch.log_softmax(weight * lp_draft + (1 - weight) * lp_causal, dim=-1)


def check_prefix(canvas: torch.Tensor, attention_mask: torch.Tensor, drafted: torch.Tensor, mask_id: int) -> None:
    """The causal model needs a real token before the draft and no mask inside the prefix it reads."""
    for row in range(drafted.shape[0]):
        positions = drafted[row].nonzero().squeeze(-1)
        first, last = int(positions[0]), int(positions[-1])
        if first == 0 or not attention_mask[row, first - 1]:
            raise ValueError("apd needs a real token (BOS or prompt) before the first masked position")
        if (canvas[row, :last] == mask_id).any():
            raise ValueError("apd fills left to right: found a mask left of the drafted positions")
