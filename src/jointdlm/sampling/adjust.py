"""ADJUST: one base pass, then the head conditions each of the step's tokens on the ones just written.

For each of the step's tokens: pick the position with the unmasking rule on the current (head-updated)
distributions, sample it, run the head on the updated string. No head pass follows the step's last token. After
the step's first token the head's passes choose among the `candidates` (8) positions the base pass ranked best:
a pass then computes queries, MLP and logits at those few positions, not at every masked one (the published
sampler lets the head choose anywhere; `adjust:candidates=N` with N the canvas length does that).

Plain `adjust` writes exactly K tokens per step. With a test it is adaptive: K becomes the most a step may
write, and after each head pass the step goes on only while the next position passes the test on the
head-updated distributions:
* `adjust:tau=0.9` — the next position's confidence (its top probability) is at least tau;
* `adjust:gamma=1` — as EB-Sampler: the entropies of the step's tokens, less the largest, sum to at most gamma.
The first token of a step is always written. Rows stop independently; a row's head passes are counted only
while it is still writing.

`adjust:threshold=0.9` opens each step with the threshold sampler's round: from the base pass, every position
whose confidence is at least the threshold (at least one), then up to K-1 more tokens, one per head pass. The
sure tokens cost no head pass; the head's passes go to the uncertain ones, whose joint naive parallel gets wrong.
Heads of the default recipe (every pass from the base's hidden states) keep it: 0.94-0.98 at K=4 and
0.84-0.97 at K=8 on seven heads of three languages (as fixed K does). Chained heads (saved before 2026-12-03) need
`train-adjust --threshold-share 0.5`, without which they collapsed on 2 of 4 (docs/results.md §2, §5). At the
training-free threshold's own setting, `adjust:threshold=0.5` K=2 is `threshold:tau=0.5:extra=1` with its unsure
token from the head: on template it matched that sampler's 0.980 at 2.1 base passes on three heads, and on choice it
was level with 0.9 or better at fewer passes (docs/results.md §5)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..adjust.head import AdjustHead, HeadCarry
from .base import StepContext, StepResult, resolve_config
from .rules import Marginals, select_top
from .threshold import sure_count


@dataclass(frozen=True)
class AdjustConfig:
    tau: float | None = None
    gamma: float | None = None
    threshold: float | None = None
    candidates: int = 8
    """After the step's first token(s), the head's passes compute and choose among only this many positions: the
    best-ranked by the base pass (at least K-1). Quality measured the same as choosing among every masked
    position, at 4 to 8 candidates and at all of them (docs/results.md §6), while a head pass then costs about the
    candidates instead of the canvas. Set it to the canvas length to let the head choose anywhere."""

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if sum(v is not None for v in (self.tau, self.gamma, self.threshold)) > 1:
            raise ValueError("give one of tau (confidence test), gamma (entropy test) or threshold (opening round)")
        if self.threshold is not None and not (math.isfinite(self.threshold) and 0 < self.threshold <= 1):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.tau is not None and not (math.isfinite(self.tau) and 0 <= self.tau <= 1):
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")

    @property
    def adaptive(self) -> bool:
        """Whether the number of tokens a step writes varies (the schedule's K is then a cap)."""
        return self.tested or self.threshold is not None

    @property
    def tested(self) -> bool:
        """Whether each head token after the first must pass a test (tau or gamma)."""
        return self.tau is not None or self.gamma is not None


class AdjustSampler:
    name = "adjust"

    def __init__(self, head: AdjustHead, config: AdjustConfig | None = None, **settings: Any) -> None:
        self.head = head
        self.config = resolve_config(AdjustConfig, config, settings)
        self.follows_budget = not self.config.adaptive
        if (self.config.threshold is not None and getattr(head, "threshold_share", None) == 0
                and not head.config.from_base_hidden):
            warnings.warn("this ADJUST head chains its passes and was trained without --threshold-share; "
                          "adjust:threshold collapsed on 2 of 4 such heads (docs/results.md §5): train a head with "
                          "the default recipe, or with --threshold-share 0.5", stacklevel=2)

    def step(self, ctx: StepContext) -> StepResult:
        out = ctx.forward()
        hidden, logits = out.hidden, out.logits  # logits at the positions of `eligible`, (N, V)
        tokens, eligible = ctx.tokens.clone(), ctx.eligible.clone()
        fill = torch.zeros_like(eligible)
        budget = ctx.budget.to(tokens.device)
        writing = budget > 0
        entropy_sum = torch.zeros(len(tokens), dtype=torch.float64, device=tokens.device)
        entropy_max = torch.zeros_like(entropy_sum)
        head_passes = torch.zeros(len(tokens), dtype=torch.long)
        carry = HeadCarry()
        candidates = None
        for r in range(int(budget.max())):
            logprobs = ctx.logprobs(logits, where=eligible)
            scores = ctx.scores(logprobs, eligible)
            if r == 0 and self.config.threshold is not None:
                confidence = scores if ctx.choice.rule == "confidence" else \
                    ctx.scores(logprobs, eligible, rule="confidence")
                chosen = select_top(confidence, sure_count(confidence, self.config.threshold).clamp(min=1) * writing)
            else:
                chosen = select_top(scores, writing.long())
            if self.config.tested:
                writing &= self._passes(logprobs, chosen, entropy_sum, entropy_max, first=r == 0)
                chosen &= writing[:, None]
            if not writing.any():
                break
            tokens = torch.where(chosen, ctx.sample(logprobs, chosen), tokens)
            fill |= chosen
            eligible = eligible & ~chosen  # a new tensor: the round's Marginals keep the old one
            if r == 0:  # the base pass's best positions after the ones just written
                candidates = select_top(scores.masked_fill(chosen, -torch.inf),
                                        (budget - 1).clamp(min=self.config.candidates))
                eligible &= candidates
            # Only rows still writing with budget left write in the next round; when there are none the step
            # ends here (a later round would read logits from before this round's writes).
            writing &= (budget > r + 1) & eligible.any(-1)
            if not writing.any():
                break
            with torch.no_grad():
                # The block's queries and the logits only where the next round reads them: the candidates still
                # to be written.
                start = self.head.pass_input(out.hidden, hidden)
                hidden, logits = self.head(ctx.model, tokens, ctx.attention_mask, start, at=eligible, carry=carry,
                                          query=candidates)
            head_passes += writing.cpu()
        return StepResult(fill=fill, tokens=tokens, base_passes=1, extra_passes=head_passes)

    def _passes(self, logprobs: Marginals, chosen: torch.Tensor, entropy_sum: torch.Tensor,
                entropy_max: torch.Tensor, first: bool) -> torch.Tensor:
        """(B,) whether each row's chosen position passes the test (the step's first token always does); for
        gamma, the accepted token's entropy joins the step's running sum."""
        at = logprobs.at(chosen)
        rows = chosen.any(-1)
        passed = torch.zeros_like(rows)
        if self.config.tau is not None:
            passed[rows] = True if first else at.max(-1).values.exp() >= self.config.tau
            return passed
        entropy = -(at.exp() * at.clamp(min=-1e30)).nan_to_num(0.0).sum(-1).double()
        new_sum = entropy_sum[rows] + entropy
        new_max = torch.maximum(entropy_max[rows], entropy)
        ok = torch.ones_like(new_sum, dtype=torch.bool) if first else new_sum - new_max <= self.config.gamma
        passed[rows] = ok
        entropy_sum[rows] = torch.where(ok, new_sum, entropy_sum[rows])
        entropy_max[rows] = torch.where(ok, new_max, entropy_max[rows])
        return passed

