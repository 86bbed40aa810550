"""EB-Sampler: fill the lowest-entropy positions while their summed uncertainty stays under a budget.

Positions are taken in order of increasing entropy; a prefix U is accepted while
sum_U H - max_U H <= gamma, i.e. while the entropy of everything but the least certain token in U (an upper
bound on the dependence the product of marginals can miss) stays within gamma. The first position is always
taken, so gamma = 0 is one token per step in lowest-entropy order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..validation import require_finite
from .base import StepContext, StepResult, resolve_config
from .rules import select_top


@dataclass(frozen=True)
class EBConfig:
    gamma: float = 0.01

    def __post_init__(self) -> None:
        require_finite(self, ("gamma",))
        if self.gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")


class EBSampler:
    name = "eb"
    follows_budget = False

    def __init__(self, config: EBConfig | None = None, **settings: Any) -> None:
        self.config = resolve_config(EBConfig, config, settings)

    def step(self, ctx: StepContext) -> StepResult:
        logprobs = ctx.logprobs(ctx.forward().logits)
        neg_entropy = ctx.scores(logprobs, rule="entropy")
        fill = select_top(neg_entropy, accepted_count(neg_entropy, self.config.gamma))
        return StepResult(fill=fill, tokens=ctx.sample(logprobs, fill), base_passes=1)


def accepted_count(neg_entropy: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) size of the longest lowest-entropy prefix whose entropy minus its largest one is <= gamma."""
    ordered = neg_entropy.sort(dim=-1, descending=True).values
    entropy = (-ordered).clamp(min=0)
    before = torch.cat([torch.zeros_like(entropy[:, :1]), entropy.cumsum(-1)[:, :-1]], dim=-1)
    return (torch.isfinite(ordered) & (before <= gamma)).sum(-1).clamp(min=1)
