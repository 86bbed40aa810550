"""ADJUST: one base pass, then the head conditions each of the step's tokens on the ones just written.

For each of the K tokens: pick the position with the unmasking rule on the current (head-updated)
distributions, sample it, run the head on the updated string. No head pass follows the step's last token.
"""

from __future__ import annotations

import torch

from ..adjust.head import AdjustHead
from .base import StepContext, StepResult
from .rules import select_top


class AdjustSampler:
    name = "adjust"
    follows_budget = True

    def __init__(self, head: AdjustHead) -> None:
        self.head = head

    def step(self, ctx: StepContext) -> StepResult:
        out = ctx.forward()
        hidden, logits = out.hidden, out.logits
        tokens, eligible = ctx.tokens.clone(), ctx.eligible.clone()
        fill = torch.zeros_like(eligible)
        rounds = int(ctx.budget.max())
        head_passes = 0
        for r in range(rounds):
            logprobs = ctx.logprobs(logits)
            chosen = select_top(ctx.scores(logprobs, eligible), (ctx.budget > r).long())
            tokens = torch.where(chosen, ctx.sample(logprobs, chosen), tokens)
            fill |= chosen
            eligible &= ~chosen
            if r < rounds - 1:
                with torch.no_grad():
                    hidden, logits = self.head(ctx.model, tokens, ctx.attention_mask, hidden)
                head_passes += 1
        return StepResult(fill=fill, tokens=tokens, base_passes=1, extra_passes=head_passes)
