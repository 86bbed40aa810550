"""Fast-dLLM threshold unmasking: from one base pass, fill every position the model is sure enough of.

The number of tokens per step follows the model's confidence instead of a schedule: confident stretches are
filled at once, uncertain ones one by one. The most confident position is always filled, so each step makes
progress; `extra=1` also fills the next most confident one. The factor variant accepts the largest n whose n-th
best confidence c_(n) satisfies (n + 1)(1 - c_(n)) < factor, which lets more tokens through when all of them are
near-certain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..validation import require_finite
from .base import StepContext, StepResult, resolve_config
from .rules import select_top


@dataclass(frozen=True)
class ThresholdConfig:
    tau: float = 0.9
    factor: float | None = None
    extra: int = 0
    """After the sure positions (or the single most confident when none is sure), also fill this many of the next
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


class ThresholdSampler:
    name = "threshold"
    follows_budget = False

    def __init__(self, config: ThresholdConfig | None = None, **settings: Any) -> None:
        self.config = resolve_config(ThresholdConfig, config, settings)

    def step(self, ctx: StepContext) -> StepResult:
        logprobs = ctx.logprobs(ctx.forward().logits)
        confidence = ctx.scores(logprobs, rule="confidence")
        fill = select_top(confidence, accepted_count(confidence, self.config))
        return StepResult(fill=fill, tokens=ctx.sample(logprobs, fill), base_passes=1)


def accepted_count(confidence: torch.Tensor, config: ThresholdConfig) -> torch.Tensor:
    """(B,) how many of each row's most confident positions to fill (at least one)."""
    if config.factor is None:
        count = sure_count(confidence, config.tau)
    else:
        ordered = confidence.sort(dim=-1, descending=True).values
        n = torch.arange(1, ordered.shape[1] + 1, dtype=ordered.dtype, device=ordered.device)
        count = (torch.isfinite(ordered) & ((n + 1) * (1 - ordered) < config.factor)).sum(-1)
    return count.clamp(min=1) + config.extra


def sure_count(confidence: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """(B,) positions per row whose confidence is at least tau (a float, or (B, 1) per row)."""
    return (confidence >= tau).sum(-1)
