"""The sampler protocol: one denoising step as a small strategy.

The loop owns the canvas; a sampler sees a `StepContext` (the model through its protocol, the current
tokens, which positions it may fill, how many the schedule asks for, each row's generator) and returns a
frozen `StepResult`. `check_step` states the invariants once; the loop runs it on every step of every sampler.
A sampler's usual step is `lp = ctx.logprobs(ctx.forward().logits)`, then `ctx.scores(lp)` to rank positions and
`ctx.sample(lp, fill)` to draw tokens: logits and log-probabilities exist only at the eligible positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch

from ..models.protocol import DiffusionLM, ModelOutput
from ..validation import require_finite
from . import rules


class NonFiniteLogitsError(ValueError):
    """The model returned NaN or Inf logits (corrupt weights, or a dtype that overflows)."""


@dataclass(frozen=True)
class TokenChoice:
    """How positions are ranked and tokens drawn; shared by every sampler."""

    rule: str = "confidence"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.rule not in rules.RULES:
            raise ValueError(f"unknown unmasking rule {self.rule!r}; choose from {', '.join(rules.RULES)}")
        require_finite(self, ("temperature", "top_p"))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class StepContext:
    model: DiffusionLM
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    eligible: torch.Tensor
    budget: torch.Tensor
    generators: list[torch.Generator]
    choice: TokenChoice
    step_index: int = 0
    step_seeds: list[int] = field(init=False)
    """One seed per row for this step, drawn from the row's generator; all noise of the step derives from it."""

    def __post_init__(self) -> None:
        self.step_seeds = [int(torch.randint(2**62, (1,), generator=g)) for g in self.generators]

    @cached_property
    def offsets(self) -> list[int]:
        """Left padding of each row: noise is keyed by a row's own positions, not the padded layout (read once per
        step: on a GPU each read waits for the device)."""
        return (self.attention_mask == 0).sum(-1).tolist()

    def forward(self, tokens: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> ModelOutput:
        """A base pass over the canvas, or over `tokens`: a probe of the canvas's rows `rows` (all when None).
        Logits come at the positions of `at` only, (N, V) in row-major order; for the canvas `at` defaults to
        the eligible positions (no sampler reads the others). Hidden states are always (B, T, d)."""
        model, attention = self.model, self.attention_mask
        if rows is not None:
            attention = attention[rows]
            model = model.subset(rows) if hasattr(model, "subset") else model
        if tokens is None and at is None:
            at = self.eligible
        with torch.no_grad():
            out = model.forward(self.tokens if tokens is None else tokens, attention, at)
        # A broken model must fail loudly, not write token 0 everywhere. A finite sum means finite logits
        # (one cheap reduction); only when it is not is the exact test run.
        if not torch.isfinite(out.logits.sum()) and not torch.isfinite(out.logits).all():
            raise NonFiniteLogitsError(f"model produced NaN/Inf logits at step {self.step_index} "
                                       "(check the weights and the dtype)")
        return out

    def logprobs(self, logits: torch.Tensor, where: torch.Tensor | None = None) -> rules.Marginals:
        """Log-probabilities (banned ids removed) at the positions of `where` (default: the eligible ones), from
        logits at those positions (N, V), which it may overwrite (a pass's fresh output, read once), or over the
        whole canvas (B, T, V)."""
        where = self.eligible if where is None else where
        if logits.dim() == 3:
            logits = logits[where]
        return rules.Marginals(where, rules.model_logprobs(logits, self.model.spec.never_sampled(), overwrite=True))

    def scores(self, logprobs: rules.Marginals, eligible: torch.Tensor | None = None,
               rule: str | None = None) -> torch.Tensor:
        """(B, T) scores by the unmasking rule (or `rule`), -inf outside `eligible` (default: the step's)."""
        return rules.position_scores(logprobs, rule or self.choice.rule,
                                     self.eligible if eligible is None else eligible, self.step_seeds, self.offsets)

    def sample(self, logprobs: rules.Marginals, fill: torch.Tensor, stream: int = 0) -> torch.Tensor:
        c = self.choice
        return rules.sample_at(logprobs, fill, self.step_seeds, c.temperature, c.top_k, c.top_p, stream, self.offsets)


@dataclass(frozen=True)
class StepResult:
    """Positions to fill (B, T bool), the ids to write there, and the passes it cost.

    `base_passes` counts every forward pass of the base model (the NFE); `extra_passes` counts passes of a
    smaller network beside it (an ADJUST head, an autoregressive scorer)."""

    fill: torch.Tensor
    tokens: torch.Tensor
    base_passes: int | torch.Tensor = 1
    extra_passes: int | torch.Tensor = 0
    """Each a number for every row, or a (B,) tensor when rows paid differently (adaptive ADJUST, PUNT's tests)."""


class Sampler(Protocol):
    name: str
    follows_budget: bool
    """True when the sampler fills exactly `budget` tokens per row (NFE then follows the schedule)."""

    def step(self, ctx: StepContext) -> StepResult: ...


def check_step(ctx: StepContext, result: StepResult, follows_budget: bool) -> None:
    """The invariants of one step, for every sampler."""
    fill, tokens = result.fill, result.tokens
    if fill.shape != ctx.tokens.shape or tokens.shape != ctx.tokens.shape:
        raise AssertionError("step result shapes differ from the canvas")
    if (fill & ~ctx.eligible).any():
        raise AssertionError("sampler filled a position that was not masked and eligible")
    counts = fill.sum(-1)
    if (counts < 1).any():
        raise AssertionError("sampler made no progress on a row that still has masks")
    if follows_budget and not torch.equal(counts, ctx.budget):
        raise AssertionError(f"sampler filled {counts.tolist()} tokens, the schedule asked for {ctx.budget.tolist()}")
    written = tokens[fill]
    spec = ctx.model.spec
    if ((written < 0) | (written >= spec.vocab_size)).any():
        raise AssertionError("sampler wrote a token id outside the vocabulary")
    if torch.isin(written, torch.tensor(spec.never_sampled(), device=written.device)).any():
        raise AssertionError("sampler wrote the mask token or another never-sampled id")
    if torch.as_tensor(result.base_passes).lt(0).any() or torch.as_tensor(result.extra_passes).lt(0).any():
        raise AssertionError("pass counts must be non-negative")


def resolve_config(config_class: type, config: object | None, settings: dict) -> object:
    """A sampler takes either its config dataclass or that dataclass's fields as keywords, not both."""
    if config is not None and settings:
        raise ValueError(f"give a {config_class.__name__} or its fields as keywords, not both")
    return config if config is not None else config_class(**settings)
