"""One token per base pass: the chain rule, i.e. the model's own joint in the order the rule picks."""

from __future__ import annotations

import torch

from .base import StepContext, StepResult
from .rules import select_top


class SequentialSampler:
    name = "sequential"
    follows_budget = True
    tokens_per_step = 1

    def step(self, ctx: StepContext) -> StepResult:
        logprobs = ctx.logprobs(ctx.forward().logits)
        fill = select_top(ctx.scores(logprobs), torch.ones_like(ctx.budget))
        return StepResult(fill=fill, tokens=ctx.sample(logprobs, fill), base_passes=1)
