"""Naive parallel unmasking: the `budget` best positions under the rule, all from one base pass.

Each token comes from its own marginal, so together they follow a product of marginals, not the joint.
"""

from __future__ import annotations

from .base import StepContext, StepResult
from .rules import select_top


class ParallelSampler:
    name = "parallel"
    follows_budget = True

    def step(self, ctx: StepContext) -> StepResult:
        logprobs = ctx.logprobs(ctx.forward().logits)
        fill = select_top(ctx.scores(logprobs), ctx.budget)
        return StepResult(fill=fill, tokens=ctx.sample(logprobs, fill), base_passes=1)
