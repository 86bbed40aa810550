"""Fast-dLLM threshold unmasking: from one base pass, fill every position the model is sure enough of.

The number of tokens per step follows the model's confidence instead of a schedule: confident stretches are filled
at once, uncertain ones one by one. As in Fast-dLLM's released code, a position's confidence here is the probability
of the token drawn there: a position whose top probability passes tau but whose draw fell in its unlikely remainder
stays masked for a later step, instead of writing that unlikely token beside the others drawn at once. (Accepting
every sure position's draw wrote a word among the PADs of English's tail in two thirds of the samples, MAUVE 0.68
against 0.95; on template's τ=0.5 this rule writes the more likely strings more often, docs/results.md §5.) When no
position passes, the most confident one is filled (as K=1 would draw it), so each step makes progress; `extra=1`
also fills the next most confident one. The factor variant accepts the largest n whose n-th best confidence c_(n)
satisfies (n + 1)(1 - c_(n)) < factor, which lets more tokens through when all of them are near-certain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..validation import require_finite
from .base import StepContext, StepResult, resolve_config
from .rules import Marginals, select_top


@dataclass(frozen=True)
class ThresholdConfig:
    tau: float = 0.9
    factor: float | None = None
    extra: int = 0
    """After the accepted positions (or the single most confident when none is), also fill this many of the next
    most confident: with 1, K=1 order for the unsure tokens and the sure ones alongside, but for a step with
    nothing sure, which writes two unsure tokens. It halved the base passes
    at K=1 validity on template and choice, and lost half the validity on permutation, where a sure token
    constrains the others (docs/results.md §5)."""

    def __post_init__(self) -> None:
        require_finite(self, ("tau", "factor"))
        if self.tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau}")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor must be a finite number > 0 (or None), got {self.factor}")
        if isinstance(self.extra, bool) or not isinstance(self.extra, int) or self.extra < 0:
            raise ValueError(f"extra must be an integer >= 0, got {self.extra}")

    @property
    def floor(self) -> float:
        """The top probability below which no position can be accepted: only positions at or above it are drawn
        before the test (with the factor rule, n >= 1 needs c_(n) > 1 - factor / 2)."""
        return self.tau if self.factor is None else 1 - self.factor / 2


class ThresholdSampler:
    name = "threshold"
    follows_budget = False

    def __init__(self, config: ThresholdConfig | None = None, **settings: Any) -> None:
        self.config = resolve_config(ThresholdConfig, config, settings)

    def step(self, ctx: StepContext) -> StepResult:
        logprobs = ctx.logprobs(ctx.forward().logits)
        confidence = ctx.scores(logprobs, rule="confidence")
        fill, tokens = threshold_round(ctx, logprobs, confidence, self.config)
        return StepResult(fill=fill, tokens=tokens, base_passes=1)


def threshold_round(ctx: StepContext, logprobs: Marginals, confidence: torch.Tensor, config: ThresholdConfig,
                    writing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) the positions one threshold round fills and (B, T) the tokens it writes there: those whose drawn
    token passes the test, or the most confident position when none does, then `extra` more; nothing in rows
    that are not `writing` (B,). `adjust:threshold` opens its steps with this round."""
    drawn_confidence, drawn = draws_and_confidence(ctx, logprobs, confidence, config.floor)
    accepted = select_top(drawn_confidence, accepted_count(drawn_confidence, config))
    count = accepted.sum(-1).clamp(min=1) + config.extra
    fill = select_top(confidence + 2 * accepted, count if writing is None else count * writing)
    return fill, torch.where(accepted, drawn, ctx.sample(logprobs, fill & ~accepted))


def accepted_count(confidence: torch.Tensor, config: ThresholdConfig) -> torch.Tensor:
    """(B,) how many of each row's most confident positions pass the test (tau, or the factor rule); may be 0."""
    if config.factor is None:
        return sure_count(confidence, config.tau)
    ordered = confidence.sort(dim=-1, descending=True).values
    n = torch.arange(1, ordered.shape[1] + 1, dtype=ordered.dtype, device=ordered.device)
    return (torch.isfinite(ordered) & ((n + 1) * (1 - ordered) < config.factor)).sum(-1)


def sure_count(confidence: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """(B,) positions per row whose confidence is at least tau (a float, or (B, 1) per row)."""
    return (confidence >= tau).sum(-1)


def draws_and_confidence(ctx: StepContext, logprobs: Marginals, confidence: torch.Tensor,
                         floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) float64 the (untempered) probability of the token drawn at each position whose top probability
    `confidence` is at least `floor`, -inf elsewhere; and (B, T) the tokens drawn there. A drawn token's
    probability is at most its position's top one, so no position below the floor could pass a test at it."""
    candidates = confidence >= floor
    drawn = ctx.sample(logprobs, candidates)
    probability = torch.full_like(confidence, -torch.inf)
    if candidates.any():
        rows = logprobs.at(candidates)
        chosen = drawn[candidates].to(rows.device)
        probability[candidates] = rows.gather(1, chosen[:, None]).squeeze(1).exp().to(probability)
    return probability, drawn
