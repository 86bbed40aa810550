"""ADJUST: one base pass, then the head conditions each of the step's tokens on the ones just written.

For each of the step's tokens: pick the position with the unmasking rule on the current (head-updated)
distributions, sample it, run the head on the updated string. No head pass follows the step's last token. After
the step's first token the head's passes choose among the base pass's max(K-1, `candidates`) best positions (8
candidates by default), holding at most `candidates` of them at once: the best first, and each one written is
replaced by the next in the base's order until all are in. A pass then computes queries, MLP and logits at those
few positions whatever K is, not at every masked one (the published sampler lets the head choose anywhere;
`adjust:candidates=N` with N the canvas length does that). The head's passes run at fixed shapes
(`AdjustHead.step_passes`): a fixed-K step's head rounds read nothing back from a GPU.

Plain `adjust` writes exactly K tokens per step. With a test it is adaptive: K becomes the most a step may
write, and after each head pass the step goes on only while the next position passes the test on the
head-updated distributions:
* `adjust:tau=0.9` — the token the head drew at the next position has a probability of at least tau (Fast-dLLM's
  acceptance rule, as `threshold` applies it to the base's draws); a refused draw is not written, and the next
  base pass draws that position again. (Until 2026-12-07 the test read the position's top probability before
  the draw: on template it kept K=1's errors, 0.982 validity at K ≤ 16 against this rule's 0.998 at the same
  passes; on English it wrote longer, more varied texts, MAUVE 0.961 against 0.928 at K ≤ 48, where the
  threshold-opened rows reach that MAUVE from one or two base passes: results §5.)
* `adjust:gamma=1` — as EB-Sampler: the entropies of the step's tokens, less the largest, sum to at most gamma.
The first token of a step is always written. Rows stop independently; a row's head passes are counted only
while it is still writing.

`adjust:threshold=0.9` opens each step with a threshold round from the base pass: every position whose confidence is
at least the threshold and whose drawn token is that likely too (the acceptance rule of Fast-dLLM's released code),
or the most confident position alone when there is none; then up to K-1 more tokens, one per head pass. The sure
tokens cost no head pass; the head's passes go to the uncertain ones, whose joint naive parallel gets wrong, and to
a sure position whose draw fell in its unlikely remainder, which the head then draws beside the tokens written
around it. Accepting every sure position's draw (this round's rule, and `threshold`'s, before 2026-12-07) wrote a
word among the PADs of English's tail in two thirds of the samples (NLL 8.04 against K=1's 7.17; this rule 7.14),
and at 0.5 kept the threshold's own errors on choice (0.50 validity; this rule 0.98), the same on template and on
choice at 0.9 (results §5, "Fast-dLLM's acceptance rule"). The head must have been trained on such steps
(`train-adjust --threshold-share 0.5`, the default since 2026-12-04): without it the sampler lost 0.09-0.19 validity
for one head seed in two on binding and one in three on choice, and collapsed on 2 of 4 chained heads, and it warns
for such heads (docs/results.md §2, §5). 0.9 is the setting measured on every language; with this rule 0.5 writes
more from the base pass and held validity on choice and template (one head each), and on English wrote shorter texts
than K=1 (9.7 tokens against 12.2, MAUVE 0.945 against 0.966).

`adjust:threshold=0.3:tau=0.3` holds the head's draws to the opening round's rule: every token the step writes but
its forced first has a probability of at least 0.3 where it was drawn. That is what lifts the training-free
threshold above K=1's validity on template (0.998 against 0.985), and ADJUST reaches it in fewer base passes; on
English it writes likelier, less varied text (lower NLL, lower MAUVE), as the threshold does at a low tau. With the
opening at 0.9 (`adjust:threshold=0.9:tau=0.3`) it held on every language measured (template, choice, shuffle,
permutation); the opening at 0.3 fell to 0.51 / 0.44 on permutation / shuffle at K <= 2 (results §5). Refusing
unlikely draws is a cut of the distribution: K=1 under `--top-p 0.95` is as valid, and `adjust:threshold=0.9` under
that cut matches it from one base pass, where a refused head draw ends its step (tau=0.3: 6 base passes on binding;
English: 8-10 at any tau down to 0.01; results §5, "Refusing unlikely draws is a cut")."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..adjust.head import AdjustHead
from ..validation import require_finite
from . import rules
from .base import StepContext, StepResult, resolve_config
from .rules import select_top
from .threshold import ThresholdConfig, threshold_round


@dataclass(frozen=True)
class AdjustConfig:
    tau: float | None = None
    gamma: float | None = None
    threshold: float | None = None
    candidates: int = 8
    """After the step's first token(s), the head's passes compute and choose among only this many positions, the
    best-ranked by the base pass still open; below K-1, a written one is replaced by the next in the base's order
    until the base's K-1 best have all come in. Quality measured the same as choosing among every masked position,
    at 4 to 8 candidates and at all of them (docs/results.md §6), while a head pass then costs about the candidates
    instead of the canvas or K. Set it to the canvas length to let the head choose anywhere."""

    def __post_init__(self) -> None:
        require_finite(self, ("tau", "gamma", "threshold"))
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int):
            raise ValueError(f"candidates must be an integer, got {self.candidates!r}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.gamma is not None and (self.tau is not None or self.threshold is not None):
            raise ValueError("gamma (entropy test) goes alone: not with tau (acceptance test) or threshold (opening "
                             "round)")
        if self.threshold is not None and not (0 < self.threshold <= 1):
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.tau is not None and not (0 <= self.tau <= 1):
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if self.gamma is not None and self.gamma < 0:
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
        self.opening = None if self.config.threshold is None else ThresholdConfig(tau=self.config.threshold)
        if self.config.threshold is not None and getattr(head, "threshold_share", None) == 0:
            lost = ("collapsed on 2 of 4 such heads that chain their passes" if not head.config.from_base_hidden
                    else "lost 0.09-0.19 validity for one such head in two on binding and one in three on choice")
            warnings.warn(f"this ADJUST head was trained without --threshold-share, and adjust:threshold {lost} "
                          "(docs/results.md §2, §5): retrain it with the default recipe (--threshold-share 0.5)",
                          stacklevel=2)

    def step(self, ctx: StepContext) -> StepResult:
        out = ctx.forward()
        tokens = ctx.tokens.clone()
        budget = ctx.budget.to(tokens.device)
        writing = budget > 0
        rounds = int(budget.max())
        entropy_sum = torch.zeros(len(tokens), dtype=torch.float64, device=tokens.device)
        entropy_max = torch.zeros_like(entropy_sum)
        # The first token(s) from the base pass, over every eligible position.
        logprobs = ctx.logprobs(out.logits)
        scores = ctx.scores(logprobs)
        if self.config.threshold is not None:
            confidence = scores if ctx.choice.rule == "confidence" else ctx.scores(logprobs, rule="confidence")
            fill, drawn = threshold_round(ctx, logprobs, confidence, self.opening, writing)
            tokens = torch.where(fill, drawn, tokens)
        else:
            fill = select_top(scores, writing.long())
            if self.config.gamma is not None:
                first = scores.argmax(-1)
                writing &= self._passes(logprobs.rows_at(first), writing, entropy_sum, entropy_max, first=True)
            tokens = torch.where(fill, ctx.sample(logprobs, fill), tokens)
        head_passes = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        if rounds > 1:
            index, open_, queue, queued = self._candidates(scores.masked_fill(fill, -torch.inf), rounds)
            writing &= (budget > 1) & open_.any(-1)
            if index.shape[1]:  # else the first round wrote every eligible position of every row
                self._head_rounds(ctx, out.hidden, tokens, fill, index, open_, queue, queued, writing, budget, rounds,
                                  head_passes, entropy_sum, entropy_max)
        return StepResult(fill=fill, tokens=tokens, base_passes=1, extra_passes=head_passes.cpu())

    def _candidates(self, scores: torch.Tensor, rounds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
        """The positions the head's passes choose among: the base pass's `candidates` best after the step's first
        token(s), in position order (B, C), and which of them are real (a row with fewer eligible positions
        repeats its first); then the queue (B, Q) of the next best in the base's order, up to the K-1 best in all,
        one of which comes in after each of the step's first Q passes, and which of those are real."""
        # At most what any row has left (one read back per step: a step near the canvas's end would otherwise
        # compute padding columns in every round).
        eligible = int(torch.isfinite(scores).sum(-1).max())
        width = min(self.config.candidates, eligible)
        depth = max(0, min(rounds - 1, eligible) - width)
        order = scores.argsort(dim=-1, descending=True, stable=True)[:, :width + depth]
        real = torch.isfinite(scores.gather(1, order))
        index = torch.where(real[:, :width], order[:, :width], scores.shape[1]).sort(dim=-1).values
        open_ = index < scores.shape[1]
        index = torch.where(open_, index, index[:, :1].clamp(max=scores.shape[1] - 1))
        return index, open_, order[:, width:], real[:, width:]

    def _head_rounds(self, ctx: StepContext, base_hidden: torch.Tensor, tokens: torch.Tensor, fill: torch.Tensor,
                     index: torch.Tensor, open_: torch.Tensor, queue: torch.Tensor, queued: torch.Tensor,
                     writing: torch.Tensor, budget: torch.Tensor, rounds: int, head_passes: torch.Tensor,
                     entropy_sum: torch.Tensor, entropy_max: torch.Tensor) -> None:
        """The step's tokens after the first, one per head pass, written into `tokens` and `fill` in place. Every
        shape is fixed, so on a GPU nothing is read back (but whether any row still writes, for an adaptive
        step). An adaptive step whose writing rows fall to half of those in its passes carries on with those rows
        alone: the rows that stopped would otherwise keep paying for every pass the slowest row needs."""
        passes = self.head.step_passes(ctx.model, ctx.attention_mask, base_hidden, index)
        banned = ctx.model.spec.never_sampled()
        positional = None if ctx.choice.rule not in rules.POSITIONAL_RULES else rules.positional_scores(
            ctx.choice.rule, tokens.shape, ctx.step_seeds, ctx.offsets, tokens.device)
        seeds, shift = rules.row_keys(ctx.step_seeds, ctx.offsets, tokens.device)
        c = ctx.choice
        # The rows in the passes (None: every row) and their state; written back into the caller's tensors at the
        # end, and whenever the rows narrow.
        rows = None
        row_tokens, row_fill, row_passes, row_sum, row_max = tokens, fill, head_passes, entropy_sum, entropy_max

        def write_back() -> None:
            if rows is not None:
                tokens[rows], fill[rows], head_passes[rows] = row_tokens, row_fill, row_passes
                entropy_sum[rows], entropy_max[rows] = row_sum, row_max

        written = None
        for r in range(1, rounds):
            with torch.no_grad():
                logits = rules.without_banned(passes.logits(row_tokens, written), banned, overwrite=True)
            row_passes += writing
            # Log-probabilities at every candidate only where the rule reads more than the top one; otherwise
            # at the chosen candidate alone (C x V work per pass is most of a head token on a large vocabulary).
            cheap = positional is not None or c.rule in rules.READS_ONLY_THE_TOP
            logprobs = None if cheap else torch.log_softmax(logits, dim=-1)
            if positional is not None:
                scores = positional.gather(1, passes.index)
            else:
                scores = rules.top_probability(logits) if cheap else rules.marginal_scores(logprobs, c.rule)
            scores = scores.double().masked_fill(~open_, -torch.inf)
            # The best candidate, ties to the first position (the pool is not in position order once refilled).
            top = scores == scores.max(-1, keepdim=True).values
            pick = torch.where(top, passes.index, row_tokens.shape[1]).argmin(-1)
            at_rows = logits if logprobs is None else logprobs
            at = at_rows.gather(1, pick[:, None, None].expand(-1, 1, at_rows.shape[-1])).squeeze(1)
            if logprobs is None:
                at = torch.log_softmax(at, dim=-1)
            if self.config.gamma is not None:
                writing &= self._passes(at, writing, row_sum, row_max, first=False)
            written = passes.index.gather(1, pick[:, None]).squeeze(1)
            drawn = rules.draw(at, seeds, written - shift, c.temperature, c.top_k, c.top_p)
            if self.config.tau is not None:  # the draw's own (untempered) probability, as Fast-dLLM accepts it
                writing &= at.gather(1, drawn.to(at.device)[:, None]).squeeze(1).exp().to(writing.device) \
                    >= self.config.tau
            new = torch.where(writing, drawn.to(row_tokens.device),
                              row_tokens.gather(1, written[:, None]).squeeze(1))
            row_tokens.scatter_(1, written[:, None], new[:, None])
            row_fill.scatter_(1, written[:, None],
                              (row_fill.gather(1, written[:, None]).squeeze(1) | writing)[:, None])
            # The chosen candidate leaves the pool and the next in the base's order comes in, while the queue lasts
            # (a row that did not write is done for the step either way). Only rows still writing with budget left
            # write in the next round; an adaptive step ends when none does (a fixed step's rounds are known:
            # nothing is read back).
            refill = r - 1 < queue.shape[1]
            if refill:
                open_ = open_.scatter(1, pick[:, None], queued[:, r - 1:r])
            else:
                keep = _without(pick, open_.shape[1])
                open_ = open_.gather(1, keep)
            writing &= (budget > r + 1) & open_.any(-1)
            if r + 1 == rounds or (self.config.adaptive and not writing.any()):
                break
            if refill:
                passes.replace(pick, queue[:, r - 1])
            else:
                passes.keep(keep)
            if self.config.adaptive and passes.can_select and 2 * int(writing.sum()) <= len(writing):
                write_back()
                keep_rows = writing.nonzero().squeeze(1)
                rows = keep_rows if rows is None else rows[keep_rows]
                passes.select(keep_rows)
                row_tokens, row_fill, row_passes = tokens[rows], fill[rows], head_passes[rows]
                row_sum, row_max = entropy_sum[rows], entropy_max[rows]
                open_, queue, queued, budget = open_[keep_rows], queue[keep_rows], queued[keep_rows], budget[keep_rows]
                seeds, shift, written, writing = seeds[keep_rows], shift[keep_rows], written[keep_rows], \
                    writing[keep_rows]
                if positional is not None:
                    positional = positional[keep_rows]
        write_back()

    def _passes(self, at: torch.Tensor, rows: torch.Tensor, entropy_sum: torch.Tensor,
                entropy_max: torch.Tensor, first: bool) -> torch.Tensor:
        """(B,) whether each row's chosen position (log-probabilities `at`, (B, V)) passes the entropy test, among
        the rows that chose one (the step's first token always does); the accepted token's entropy joins the
        step's running sum. (tau's test reads the drawn token, after the draw.)"""
        entropy = -(at.exp() * at.clamp(min=-1e30)).nan_to_num(0.0).sum(-1).double()
        new_sum = entropy_sum + entropy
        new_max = torch.maximum(entropy_max, entropy)
        passed = rows if first else rows & (new_sum - new_max <= self.config.gamma)
        entropy_sum.copy_(torch.where(passed, new_sum, entropy_sum))
        entropy_max.copy_(torch.where(passed, new_max, entropy_max))
        return passed


def _without(column: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width - 1) the column indices of each row but `column` (B,)."""
    keep = torch.arange(width - 1, device=column.device)
    return keep + (keep >= column[:, None])
