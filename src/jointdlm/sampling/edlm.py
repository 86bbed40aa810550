"""EDLM-style energy baseline: draw several full completions, keep the one a causal LM likes best.

One base pass gives the marginals and the unmasking rule picks the step's `budget` positions, exactly as in
naive parallel. Proposal k fills every eligible position from the marginals with noise stream k (the rest
of the block is context for the scorer). Noise is keyed by position, so proposal 0 holds at the chosen
positions exactly the tokens naive parallel would write. The causal scorer's mean NLL over the completed
canvas is the energy; the best proposal's tokens are written at the chosen positions only. With one
proposal there is nothing to choose and no scorer pass: the result is naive parallel token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..models.causal import CausalScorer
from .base import StepContext, StepResult, resolve_config
from .rules import select_top


@dataclass(frozen=True)
class EDLMConfig:
    proposals: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.proposals, bool) or not isinstance(self.proposals, int) or self.proposals < 1:
            raise ValueError(f"proposals must be an integer >= 1, got {self.proposals!r}")


class EDLMSampler:
    name = "edlm"
    follows_budget = True

    def __init__(self, config: EDLMConfig | None = None, *, scorer: CausalScorer, **settings: Any) -> None:
        self.config = resolve_config(EDLMConfig, config, settings)
        self.scorer = scorer

    def step(self, ctx: StepContext) -> StepResult:
        logprobs = ctx.logprobs(ctx.forward().logits)
        fill = select_top(ctx.scores(logprobs), ctx.budget)
        m = self.config.proposals
        if m == 1:
            return StepResult(fill=fill, tokens=ctx.sample(logprobs, fill), base_passes=1)
        check_vocabulary(self.scorer, ctx)
        proposals = torch.stack([ctx.sample(logprobs, ctx.eligible, stream=k) for k in range(m)])
        canvases = torch.where(ctx.eligible, proposals, ctx.tokens)
        energy = mean_nll(self.scorer, canvases.flatten(0, 1), ctx.attention_mask.repeat(m, 1),
                          ctx.model.spec.mask_id)
        best = energy.view(m, -1).argmin(0)
        tokens = proposals[best, torch.arange(len(best), device=best.device)]
        return StepResult(fill=fill, tokens=tokens, base_passes=1, extra_passes=m)


def check_vocabulary(scorer: CausalScorer, ctx: StepContext) -> None:
    """The scorer must read the diffusion model's token ids."""
    if scorer.model.spec.vocab_size != ctx.model.spec.vocab_size:
        raise ValueError(f"the causal scorer's vocabulary ({scorer.model.spec.vocab_size}) differs from the "
                         f"diffusion model's ({ctx.model.spec.vocab_size}); train it with --tokenizer-from")


def mean_nll(scorer: CausalScorer, tokens: torch.Tensor, attention_mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(N,) mean NLL of each canvas's visible tokens after its first real one (BOS); pads and masks skipped."""
    device = tokens.device
    tokens, attention_mask = tokens.to(scorer.device), attention_mask.to(scorer.device)
    real = attention_mask.bool()
    first = real & (real.long().cumsum(-1) == 1)
    scored = real & ~first & (tokens != mask_id)
    lp = scorer.token_logprobs(tokens, attention_mask)
    return (-(lp * scored).sum(-1) / scored.sum(-1).clamp(min=1)).to(device)
