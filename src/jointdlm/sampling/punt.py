"""PUNT (arXiv 2510.21961): keep only the candidate tokens that pass a conditional-independence test.

One base pass gives every masked position a marginal and a candidate token. Positions are ranked by the
unmasking rule (confidence by default, rank 0 = best) and each rank is read as a binary number. In the round
for bit b the still-alive positions whose bit b is 0 are anchors (their candidates are written into the
canvas) and the alive positions whose bit b is 1 are tested: position j is dropped when
KL(p_j(.|x) || p_j(.|x + anchors)) > epsilon, i.e. when the anchors would change what j should be.

Why the rounds look like this:
* Two distinct ranks differ in at least one bit, so every pair of positions meets once as anchor/tested;
  a pair that both survive was tested against each other, which is what licenses filling them together.
* Bits go from the most significant down. The first round tests the less certain half against the more
  certain half, so in a conflict the less certain token is the one dropped (the paper's rule). Rank 0 has
  every bit 0: it is always an anchor, never tested, and always survives.
* A dropped position stops being an anchor: it will not be written this step, so testing others against it
  would only drop them for nothing. The survivors are tested against (a superset of) the other survivors.

Written as "anchor when bit b is set", this is the same scheme with each code the bitwise complement of
the rank. A dropped position stops being an anchor. Cost: ceil(log2 |M|) extra batched passes at most; rounds
with nothing left to test are skipped. Test passes are full passes of the base model, so they are counted as
base passes (the NFE), not as cheap extra passes.

`punt:via=adjust` runs the tests through a trained ADJUST head instead (`--adjust DIR`): the anchors' candidates
are written and one head pass from the step's base hidden states gives the conditioned distributions, so a step
costs one base pass plus ceil(log2 |M|) head passes. The head was trained to follow one token per pass, so this
asks it to condition on many at once: measure before trusting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..validation import require_finite
from .base import StepContext, StepResult, resolve_config
from .rules import rank_of


@dataclass(frozen=True)
class PUNTConfig:
    epsilon: float = 0.1
    via: str = "base"
    """Where the conditioned distributions come from: "base" (a full base pass per round) or "adjust" (a head
    pass)."""

    def __post_init__(self) -> None:
        require_finite(self, ("epsilon",))
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {self.epsilon}")
        if self.via not in ("base", "adjust"):
            raise ValueError(f"via must be base or adjust, got {self.via!r}")


class PUNTSampler:
    name = "punt"
    follows_budget = False

    def __init__(self, config: PUNTConfig | None = None, head: Any = None, **settings: Any) -> None:
        self.config = resolve_config(PUNTConfig, config, settings)
        if (self.config.via == "adjust") != (head is not None):
            raise ValueError("punt:via=adjust needs an ADJUST head (--adjust DIR), and only it uses one")
        self.head = head

    def step(self, ctx: StepContext) -> StepResult:
        out = ctx.forward()
        logprobs = ctx.logprobs(out.logits)
        candidates = ctx.sample(logprobs, ctx.eligible)
        ranks = rank_of(ctx.scores(logprobs))
        alive = ctx.eligible.clone()
        rounds = (int(ctx.eligible.sum(-1).max()) - 1).bit_length()
        # Per row: a round probes only the rows with a position to test, and only those pay for it (a row's count
        # must not depend on the rows batched with it).
        passes = torch.zeros(len(ctx.tokens), dtype=torch.long, device=ctx.tokens.device)
        for bit in reversed(range(rounds)):
            upper = (ranks >> bit) & 1 == 0
            tested = alive & ~upper
            rows = tested.any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            probe = torch.where(alive & upper, candidates, ctx.tokens)[rows]
            # Only the tested positions are read: logits there, (M, V) in the same row-major order as `tested`.
            if self.head is None:
                logits = ctx.forward(probe, rows, at=tested[rows]).logits
            else:
                with torch.no_grad():
                    logits = self.head(ctx.model, probe, ctx.attention_mask[rows], out.hidden[rows],
                                       at=tested[rows])[1]
            kl = kl_divergence(logprobs.at(tested), ctx.logprobs(logits, where=tested).values)
            alive[tested] = ~(kl > self.config.epsilon)  # a position whose marginal moved depends on the upper half
            passes[rows] += 1
        if self.head is None:
            return StepResult(fill=alive, tokens=candidates, base_passes=1 + passes.cpu(), extra_passes=0)
        return StepResult(fill=alive, tokens=candidates, base_passes=1, extra_passes=passes.cpu())


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension; ids with p = 0 contribute nothing."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
