"""Training the ADJUST head by KL distillation from the frozen base.

One training example: a trajectory, a state x_t on it, a depth n in 1..rollout-1 (P(n) proportional to
0.75^(n-1)). The head starts from the base's hidden states at x_t, is fed the trajectory's next n true tokens one
pass at a time (teacher forcing), and after the n-th pass is fitted to the base's own distributions on x_t + those
n tokens: KL(p_base(. | x_t + n) || p_head), averaged over the positions still masked. (A head whose passes all start
from the base's hidden states, every head since 2026-12-03, reads the n tokens in its last pass alone: only that one
is computed.)

The recipe (docs/results.md §2 measures each part):
* **Where the sampler goes.** Besides the user's K=1 trajectories, each round collects on-policy states: the
  K>1 sampler (naive parallel first, then ADJUST with the head trained so far) is stopped after a random number
  of steps and continued with K=1, which gives the true next tokens from exactly the states that sampling at
  K>1 reaches (DAgger). Rounds: collect, train until held-out KL stops falling, collect with the new head, ...
* **Where the signal is.** Most states teach nothing: when the tokens written next are certain, the base's
  marginals do not move (stale KL = 0). Before training, one no-grad sweep measures the stale KL of every
  (trajectory, state, depth); half of each batch is drawn in proportion to it, and importance weights
  1 / ((1 - f) + f * stale / mean stale) keep the objective the uniform one.
* **Every kind of step on one scale.** Steps follow the K=1 order, fixed-K ADJUST's own passes or
  `adjust:threshold`'s passes; each step's loss is scaled by the running mean stale KL of the K=1 order's steps over
  that of its own kind, so that no kind's gradients set Adam's step size for the others (`_kind_scale`).
* **Until it has learned.** Held-out KL on K=1 and on on-policy states is measured every `eval_every` steps, on
  a moving average of the weights. A plateau (no 3% gain for `patience` evaluations) lowers the learning rate
  once, the next one ends the round. The best averaged weights of each round are kept.
* **A verdict.** The run ends with the held-out head/stale KL ratio per depth and kind of state, and a warning
  when the head learned little.
Only the head trains; the base is checked bit for bit at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..models.protocol import DiffusionLM, ModelOutput
from ..outputs import atomic_write_text, check_output_dir
from ..sampling.rules import Marginals, position_scores, rank_of, select_top
from ..sampling.threshold import sure_count
from ..validation import require_finite, require_positive
from .head import AdjustHead, AdjustHeadConfig
from .trajectories import Trajectories, TrajectoryConfig, collect_trajectories, load_trajectories

if TYPE_CHECKING:
    from accelerate import Accelerator

STATE_FILE = "adjust_trainer_state.pt"
LOG_FILE = "adjust_log.jsonl"
VERDICT_FILE = "adjust_verdict.json"
POLICY_HEAD_FILE = "policy_head.safetensors"
LEARNED_LITTLE = 0.5
"""A held-out head/stale KL ratio above this at depth >= 2 means the head learned little."""
LITTLE_TO_LEARN = 0.1
"""A depth whose stale KL is below this share of the largest stale KL of its kind of state has almost nothing to
learn, and its ratio is noise: the prompted tasks mix's on-policy depth 7 (0.0015 nats against 0.055 at depth 3)
read 1.84 with an absolute head KL of 0.005 and K=1-level accuracy. It is not counted as "learned little"."""
DEFAULT_ROLLOUT = 11
"""`AdjustTrainConfig.rollout=None` trains depths 1..10 (capped by the generated length)."""
ONPOLICY_K = 8
"""On-policy states come from K in {2, k, 2k}, k = min(rollout, ONPOLICY_K): a rollout above 8 trains deeper passes
of the same samplers, not other K."""
REFERENCE_WIDTH = 128
REFERENCE_LR = 3e-3


class MismatchedRunError(ValueError):
    """The output directory holds a run trained with other settings, base or trajectories (nothing was touched);
    `problems` says what differs."""

    def __init__(self, out: Path, problems: list[str]) -> None:
        super().__init__(f"{out} holds a training run that cannot be resumed with these settings "
                         f"({'; '.join(problems)}); use a new --out, or the same flags, base and trajectories")
        self.problems = problems


@dataclass(frozen=True)
class AdjustTrainConfig:
    max_steps: int = 6000
    """Upper bound on optimizer steps over all rounds; training normally stops earlier, on held-out KL."""
    rollout: int | None = None
    """Depths 1..rollout-1 are trained (see depth_probabilities); on-policy states come from K in {2, k, 2k}, k =
    min(rollout, ONPOLICY_K). None: 11 (depths up to 10: a K=8 step's and most of a one-base-pass step's head
    passes), or the trajectories' generated length when shorter. Rollout 8 against 4 (depths 1-3): permutation's
    K=8 0.850 / 0.894 -> 0.966 / 0.970, English K=8 NLL 7.83 -> 7.60 (K=1 7.62), 14-25% more time per step
    (docs/results.md §2, "Rollout 8 as the default"). 11 against 8: template's one-base-pass row 0.9772 / 0.9756 ->
    0.9788 / 0.9790 (two seeds, 24,000 samples each; K=1 0.9785), fixed K=4 / 8, choice and permutation level, 11%
    more time (§2, "Depths 1 to 10")."""
    batch_size: int = 64
    """States per step. On the tiny choice base with steps capped at 1,500, 64 recovered 100% for both head seeds
    where 32 left one at 66%, in the same wall time; on `small` bases quality was equal (docs/results.md §2)."""
    lr: float | None = None
    """None: 3e-3 for bases up to d=128, scaled by 128/d above (Adam steps per weight shrink with width)."""
    warmup_steps: int = 100
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    onpolicy_rounds: int = 2
    """Rounds of on-policy states: round 0 from naive parallel (before training), round r from the head
    trained in the rounds before. 0 trains on the K=1 trajectories alone. The head's update after the base's final
    norm trains from round 1, so a run of fewer than 2 rounds has none (`AdjustHeadConfig.after_norm`)."""
    onpolicy_fraction: float = 0.5
    """Trajectories per on-policy round, as a fraction of the K=1 trajectories given."""
    focus: float = 0.5
    """Share of each batch drawn in proportion to the stale KL (importance weighted); 0 = uniform states."""
    patience: int = 3
    """Evaluations without a 3% gain in held-out KL that count as a plateau (0: never stop early)."""
    lr_decays: int = 1
    """Plateaus that lower the learning rate (x0.3), over the whole run (a round starts at the rate the last one
    ended with); once they are used up, the next plateau ends the round."""
    min_round_steps: int = 500
    max_round_steps: int = 2500
    """A round that is still improving ends here, so that the next round's states come from a recent head."""
    threshold_share: float = 0.5
    """Share of steps trained on the passes of `adjust:threshold` (the threshold round on the base's marginals, then
    the head's own positions, near-ties explored; thresholds uniform in [0.5, 0.95]); the rest follow fixed-K
    ADJUST's own passes (`own_share`) and the trajectories' K=1 order. With it, on-policy rounds also start from
    that sampler's steps and held-out KL is measured on its passes. Without it `adjust:threshold` lost 0.09-0.19
    validity for one head seed in two on binding and one in three on choice (a threshold round writes more fresh
    tokens at once than the fixed-K orders teach), and one choice seed in three lost 0.06 at fixed K=4 and 6;
    with it no head measured lost more than 0.031 to K=1 at any K under either sampler (choice 3 seeds,
    permutation 2, binding 2; fixed K 0.005 lower on average on permutation, level on the demo's English over
    two seeds; docs/results.md §2, §3). Its steps' losses are scaled to the K=1 order's (`_kind_scale`): unscaled,
    on the prompted tasks mix they outweighed the rest a hundredfold and the head learned little (§4). 0 trains for
    fixed K alone."""
    own_share: float = 0.25
    """Share of steps trained on fixed-K ADJUST's own passes (the base's most confident position, then the head's
    own picks, near-ties explored as for `threshold_share`) instead of the K=1 order. Without it one head seed in
    three on the demo's template base failed at some K, in states where the head picks a position the K=1 order
    would not have (docs/results.md §2)."""
    ema_decay: float = 0.995
    """Held-out KL is measured on, and the head exported from, an exponential moving average of the weights
    (time constant 1 / (1 - decay) steps); 0 uses the raw weights."""
    eval_every: int = 250
    save_every: int = 250
    heldout: int = 64
    heldout_examples: int = 256
    """Held-out states scored per kind of state and depth at each evaluation (drawn from the `heldout` trajectories
    with a fixed seed): the evaluations' cost. Fewer make them cheaper and the plateau test noisier."""
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.rollout is not None and self.rollout < 2:
            raise ValueError(f"rollout must be >= 2 (depths 1..rollout-1), got {self.rollout}")
        require_positive(self, ("max_steps", "batch_size", "eval_every", "save_every", "heldout_examples"))
        require_finite(self, ("lr", "grad_clip", "onpolicy_fraction", "focus", "weight_decay", "threshold_share",
                              "own_share"))
        if not (0.0 <= self.threshold_share and 0.0 <= self.own_share and self.threshold_share + self.own_share <= 1.0):
            raise ValueError(f"threshold_share and own_share must be >= 0 with a sum of at most 1, got "
                             f"{self.threshold_share} and {self.own_share} (defaults 0.5 and 0.25: lower "
                             "--threshold-share or --own-share)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.heldout < 0 or self.patience < 0 or self.onpolicy_rounds < 0 or self.warmup_steps < 0:
            raise ValueError("heldout, patience, onpolicy_rounds and warmup_steps must be >= 0")
        if not 0.0 <= self.focus < 1.0:
            raise ValueError(f"focus must be in [0, 1), got {self.focus}")
        if not 0.0 < self.onpolicy_fraction <= 4.0:
            raise ValueError(f"onpolicy_fraction must be in (0, 4], got {self.onpolicy_fraction}")

    def learning_rate(self, d_model: int) -> float:
        return self.lr if self.lr is not None else REFERENCE_LR * min(1.0, REFERENCE_WIDTH / d_model)


def depth_probabilities(rollout: int) -> torch.Tensor:
    """P(depth n) proportional to 0.75^(n-1), so the deep depths get a share of each batch: the one-base-pass
    sampler's last head passes run at depths 8-10 on template, where heads trained on depths 1-7 at 0.5^(n-1) made
    most of their excess errors (docs/results.md §5, "Where the one-pass template row loses"; §2, "Depths 1 to
    10")."""
    weights = torch.tensor([0.75 ** (n - 1) for n in range(1, rollout)])
    return weights / weights.sum()


def _logprobs(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    logits = logits.float().clone()
    logits[..., banned] = -1e9
    return torch.log_softmax(logits, dim=-1)


def row_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, masked: torch.Tensor,
           banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum over masked positions of KL(teacher || student), number of masked positions), on the
    distributions samplers draw from. Logits are (B, T, V), or (N, V) at the True positions of `masked`."""
    t, s = _logprobs(teacher_logits, banned), _logprobs(student_logits, banned)
    kl = (t.exp() * (t - s)).sum(-1)
    count = masked.sum(-1).to(kl.dtype)
    if kl.dim() == 1:
        rows = masked.nonzero()[:, 0]
        return torch.zeros_like(count).index_add_(0, rows, kl), count
    return (kl * masked).sum(-1), count


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, masked: torch.Tensor,
              banned: list[int]) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student)."""
    total, count = row_kl(teacher_logits, student_logits, masked, banned)
    return total.sum() / count.sum().clamp(min=1)


@dataclass
class Batch:
    tokens: torch.Tensor     # (B, P + L) canvas at state x_t
    attention: torch.Tensor  # (B, P + L)
    steps: list[torch.Tensor]  # n boolean (B, P + L) masks: the position written at each teacher-forced pass
    targets: torch.Tensor    # (B, P + L) the trajectory's final tokens (prefix included)
    weights: torch.Tensor    # (B,) importance weights
    threshold: torch.Tensor | None = None
    """(B,) when set, the positions are the sampler's own (`adjust:threshold`): the first pass follows the
    threshold round on the base's marginals, each later one the head's most confident position; `steps` then
    only gives the number of passes."""
    pick_rank: torch.Tensor | None = None
    """(B, n) with `threshold`: which position (by rank of the head's confidence, 0 = the sampler's pick) each
    later pass writes; None = the sampler's picks. Training explores near-ties this way."""


def make_batch(data: Trajectories, rows: torch.Tensor, states: torch.Tensor, depth: int, mask_id: int,
               device: str, weights: torch.Tensor | None = None, threshold: torch.Tensor | None = None,
               pick_rank: torch.Tensor | None = None) -> Batch:
    prefix, order, final = data.prefix[rows], data.order[rows], data.tokens[rows]
    width = prefix.shape[1]
    attention = torch.cat([(torch.arange(width) >= width - data.prefix_len[rows][:, None]).long(),
                           torch.ones_like(final)], dim=1)
    targets = torch.cat([prefix, final], dim=1)
    known = order < states[:, None]
    tokens = torch.cat([prefix, torch.where(known, final, torch.full_like(final, mask_id))], dim=1)
    pad = torch.zeros(len(rows), width, dtype=torch.bool)
    steps = [torch.cat([pad, order == (states[:, None] + m)], dim=1).to(device) for m in range(depth)]
    weights = torch.ones(len(rows)) if weights is None else weights
    return Batch(tokens.to(device), attention.to(device), steps, targets.to(device), weights.float().to(device),
                 None if threshold is None else threshold.float().to(device),
                 None if pick_rank is None else pick_rank.to(device))


class RolloutLoss(nn.Module):
    """The whole teacher-forced rollout as one module call, so DDP sees one forward per step."""

    def __init__(self, head: AdjustHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, base: DiffusionLM, batch: Batch) -> tuple[torch.Tensor, ...]:
        """(weighted KL of the head, weighted KL of the stale marginals, per-row head KL sums, per-row stale KL
        sums, per-row masked counts) after len(batch.steps) passes."""
        banned = base.spec.never_sampled()
        if batch.threshold is not None:
            hidden, final, stale_logits = self._own_positions(base, batch, banned)
        else:
            final = torch.where(torch.stack(batch.steps).any(0), batch.targets, batch.tokens)
            # Logits only where the loss reads them: the positions still masked after the last pass.
            *_, (_, start, final, hidden) = self._teacher_forced(base, batch, at=final == base.spec.mask_id,
                                                                 read={len(batch.steps)})
            stale_logits = start.logits
        head_sum, stale_sum, count = self._scores(base, batch, final, hidden, stale_logits, banned)
        norm = (batch.weights * count).sum().clamp(min=1)
        head_loss = (batch.weights * head_sum).sum() / norm
        if torch.is_grad_enabled() and not head_loss.requires_grad:
            # Nothing left masked in the whole batch (a threshold round wrote every position): a zero loss that
            # still reaches every weight, so backward, and DDP's gradient sync, run as on any other step.
            head_loss = head_loss + 0.0 * sum(p.sum() for p in self.head.parameters())
        return (head_loss, (batch.weights * stale_sum).sum() / norm, head_sum.detach(), stale_sum, count)

    @torch.no_grad()
    def per_depth(self, base: DiffusionLM, batch: Batch,
                  depths: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each depth n in `depths` (at most len(batch.steps)): (per-row head KL sums, per-row stale KL sums,
        per-row masked counts) after n of the batch's teacher-forced passes, as `forward` gives for a batch of
        depth n, from one rollout instead of one per depth."""
        banned = base.spec.never_sampled()
        masked = batch.tokens == base.spec.mask_id
        out, deepest = [], max(depths)
        for n, start, tokens, hidden in self._teacher_forced(base, batch, at=masked, read=set(depths)):
            stale_logits = start.logits[(tokens == base.spec.mask_id)[masked]]
            out.append(self._scores(base, batch, tokens, hidden, stale_logits, banned))
            if n == deepest:
                break
        return out

    def _teacher_forced(self, base: DiffusionLM, batch: Batch, at: torch.Tensor,
                        read: set[int] | None = None) -> Iterator[tuple[int, ModelOutput, torch.Tensor, torch.Tensor]]:
        """The step's base pass (logits at `at`), then one head pass per teacher-forced step of the batch: yields
        (n, the base pass, the canvas, the head's hidden states) after each pass n in `read` (default: every one).
        A head whose passes all start from the base's hidden states computes only the passes read (its next pass
        does not start from an unread one): a depth-n training example costs one pass, not n."""
        with torch.no_grad():
            start = base.forward(batch.tokens, batch.attention, at=at)
        hidden, tokens = start.hidden, batch.tokens
        skip_unread = read is not None and self.head.config.from_base_hidden
        for n, written in enumerate(batch.steps, start=1):
            tokens = torch.where(written, batch.targets, tokens)
            if skip_unread and n not in read:
                continue
            hidden = self.head.update(base, tokens, batch.attention, self.head.pass_input(start.hidden, hidden))
            if read is None or n in read:
                yield n, start, tokens, hidden

    def _scores(self, base: DiffusionLM, batch: Batch, canvas: torch.Tensor, hidden: torch.Tensor,
                stale_logits: torch.Tensor, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row on `canvas`'s masked positions: (head KL sums, stale KL sums, counts), both against the base's
        distributions on that canvas; only the head's KL carries a gradient. `stale_logits` are read there."""
        still_masked = canvas == base.spec.mask_id
        with torch.no_grad():
            teacher = base.forward(canvas, batch.attention, at=still_masked).logits
            stale_sum, _ = row_kl(teacher, stale_logits, still_masked, banned)
        head_sum, count = row_kl(teacher, self.head.logits(base, hidden[still_masked]), still_masked, banned)
        return head_sum, stale_sum, count

    def _own_positions(self, base: DiffusionLM, batch: Batch,
                       banned: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The `adjust:threshold` step's passes (with threshold OWN_PICKS: fixed-K ADJUST's, whose first pass
        writes the base's most confident position) with the trajectory's tokens: (the head's last hidden states, the
        canvas they describe, the base's stale logits at its masked positions). Positions are chosen as the
        sampler chooses them (threshold round on the base's marginals, then the head's most confident), so the
        head learns on the canvases that sampler makes; the tokens stay the trajectory's (a joint sample)."""
        mask_id = base.spec.mask_id
        masked = batch.tokens == mask_id
        with torch.no_grad():
            start = base.forward(batch.tokens, batch.attention, at=masked)
            confidence = _confidence(start.logits, masked, banned)
            chosen = select_top(confidence, sure_count(confidence, batch.threshold[:, None]).clamp(min=1))
        tokens, hidden = torch.where(chosen, batch.targets, batch.tokens), start.hidden
        last, chained = len(batch.steps) - 1, not self.head.config.from_base_hidden
        for m in range(len(batch.steps)):
            # A pass before the last only picks the next position; with passes that start from the base's hidden
            # states no gradient reaches the loss through it.
            with torch.set_grad_enabled(torch.is_grad_enabled() and (m == last or chained)):
                hidden = self.head.update(base, tokens, batch.attention, self.head.pass_input(start.hidden, hidden))
            if m == last:
                break
            with torch.no_grad():
                masked_now = tokens == mask_id
                confidence = _confidence(self.head.logits(base, hidden[masked_now].detach()), masked_now, banned)
                left = masked_now.sum(-1)
                wanted = torch.zeros_like(left) if batch.pick_rank is None else batch.pick_rank[:, m]
                rank = torch.minimum(wanted, left - 1)  # -1 (nothing) in rows with no mask left
                chosen = (rank_of(confidence) == rank[:, None]) & masked_now
            tokens = torch.where(chosen, batch.targets, tokens)
        return hidden, tokens, start.logits[(tokens == mask_id)[masked]]


def _confidence(logits: torch.Tensor, where: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """(B, T) top probability at the True positions of `where` (logits (N, V) there), -inf elsewhere: the
    sampler's confidence rule on the same log-probabilities."""
    return position_scores(Marginals(where, _logprobs(logits, banned)), "confidence", where, step_seeds=())


# ---------------------------------------------------------------------------------------------------------------
# Training states: several collections, their stale-KL tables, and weighted draws


def example_table(data: Trajectories, rollout: int) -> torch.Tensor:
    """(N, L, rollout-1): 0 where (state j, depth n) is a training example, NaN where it is not (j before the
    trajectory's start, or nothing left masked after n more tokens)."""
    length = data.length
    j = torch.arange(length)[None, :, None]
    n = torch.arange(1, rollout)[None, None, :]
    valid = (j >= data.start[:, None, None]) & (j + n < length)
    return torch.zeros(valid.shape).masked_fill(~valid, float("nan"))


@torch.no_grad()
def stale_table(base: DiffusionLM, data: Trajectories, rollout: int, device: str, batch_size: int = 64,
                progress: bool = False, accelerator: Accelerator | None = None) -> torch.Tensor:
    """(N, L, rollout-1): KL(p(. | state j+n) || p(. | state j)) averaged over the positions still masked at
    j+n, for every trajectory, state j and depth n; NaN where (j, n) is not a training example (j before the
    trajectory's start, or no mask left). One no-grad base pass per state, keeping a window of `rollout`
    states' log-probabilities. With an `accelerator` of several processes each sweeps its share of the batches
    and every process gets the whole table, the numbers one process computes (each process once swept them all:
    as many base passes as collecting the trajectories, on every process)."""
    n_rows, length = data.tokens.shape
    table = torch.full((n_rows, length, rollout - 1), float("nan"))
    banned = base.spec.never_sampled()
    mask_id = base.spec.mask_id
    width = data.prefix.shape[1]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    firsts = range(rank * batch_size, n_rows, world * batch_size)
    # As a context, the bar's line ends even when a batch fails (an error then starts its own line).
    with tqdm(total=sum(min(batch_size, n_rows - f) for f in firsts), desc="stale KL sweep", disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        for first in firsts:
            rows = torch.arange(first, min(first + batch_size, n_rows))
            order, start = data.order[rows], data.start[rows]
            window: list[torch.Tensor] = []
            for j in range(int(start.min()), length + 1):
                batch = make_batch(data, rows, torch.full((len(rows),), j), 0, mask_id, device)
                logprobs = _logprobs(base.forward(batch.tokens, batch.attention).logits[:, width:], banned)
                window.append(logprobs)
                window = window[-rollout:]
                masked = (order >= j).to(logprobs.device)
                if not masked.any():
                    break
                # KL(p || q_n) = sum p log p - sum p log q_n: one exp per state and a dot product per depth (4x
                # cheaper than the whole difference per depth, which made rollout 8's sweep 1.7x rollout 4's).
                probs = logprobs.exp()
                negentropy = torch.linalg.vecdot(probs, logprobs)
                has_mask = masked.any(-1).cpu()
                for n in range(1, min(rollout, len(window))):
                    kl = (negentropy - torch.linalg.vecdot(probs, window[-1 - n])).clamp(min=0)
                    value = ((kl * masked).sum(-1) / masked.sum(-1).clamp(min=1)).cpu()
                    ok = (j - n >= start) & has_mask
                    table[rows[ok], j - n, n - 1] = value[ok]
            bar.update(len(rows))
    if world > 1:
        return _exchange_rows(table, torch.arange(n_rows) // batch_size % world == rank, accelerator)
    return table


def _exchange_rows(values: torch.Tensor, mine: torch.Tensor, accelerator: Accelerator,
                   chunk: int = 4096) -> torch.Tensor:
    """(CPU) `values` with every process's rows (`mine`, (N,) bool: the rows this process computed; the rest are
    ignored) on every process, exactly: a sum in which each element is non-zero on one process only (NaN + 0
    stays NaN), in chunks of rows so that a large table never sits on a device whole."""
    values = torch.where(mine.view(-1, *[1] * (values.dim() - 1)), values, torch.zeros((), dtype=values.dtype))
    for first in range(0, len(values), chunk):
        part = slice(first, first + chunk)
        values[part] = accelerator.reduce(values[part].to(accelerator.device), "sum").cpu()
    return values


def _merge(collections: list[Trajectories]) -> tuple[Trajectories, torch.Tensor]:
    """One Trajectories holding every collection (prefixes left-padded to one width) and each row's source."""
    width = max(c.prefix.shape[1] for c in collections)
    pad_id = 0

    def pad(prefix: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full((prefix.shape[0], width - prefix.shape[1]), pad_id, dtype=prefix.dtype),
                          prefix], dim=1)

    merged = Trajectories(prefix=torch.cat([pad(c.prefix) for c in collections]),
                          prefix_len=torch.cat([c.prefix_len for c in collections]),
                          tokens=torch.cat([c.tokens for c in collections]),
                          order=torch.cat([c.order for c in collections]),
                          config=collections[0].config, fingerprint=collections[0].fingerprint,
                          start=torch.cat([c.start for c in collections]))
    source = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(collections)])
    return merged, source


class StateSampler:
    """Draws (trajectory, state) pairs for one depth: a mixture of the base distribution p (each collection
    equally likely, states uniform inside it) and p weighted by stale KL, with importance weights p/q."""

    def __init__(self, collections: list[Trajectories], tables: list[torch.Tensor], rollout: int,
                 focus: float) -> None:
        self.data, source = _merge(collections)
        table = torch.cat(tables)
        self.focus = focus
        self.length = self.data.length
        self.p: dict[int, torch.Tensor] = {}
        self.q_cdf: dict[int, torch.Tensor] = {}
        self.p_cdf: dict[int, torch.Tensor] = {}
        self.ratio: dict[int, torch.Tensor] = {}
        self.mass: dict[int, float] = {}
        for n in range(1, min(rollout, self.length)):
            stale = table[:, :, n - 1]
            valid = ~torch.isnan(stale)
            stale = stale.nan_to_num(0.0).clamp(min=0)
            p = torch.zeros_like(stale, dtype=torch.float64)
            for c in range(len(collections)):
                in_c = valid & (source == c)[:, None]
                if in_c.any():
                    p[in_c] = 1.0 / int(in_c.sum())
            if p.sum() == 0:
                continue
            p /= p.sum()
            mean = float((p * stale).sum())
            self.p[n] = p.flatten()
            self.p_cdf[n] = p.flatten().cumsum(0)
            self.ratio[n] = (stale / mean).flatten() if mean > 0 else torch.zeros(p.numel())
            q = p * stale
            self.q_cdf[n] = q.flatten().cumsum(0) if mean > 0 else self.p_cdf[n]
            # Share of the objective carried by the 10% of examples (by p) with the largest stale KL.
            by_stale = self.ratio[n].argsort(descending=True)
            top = by_stale[self.p[n][by_stale].cumsum(0) <= 0.1]
            self.mass[n] = float((self.p[n][top] * self.ratio[n][top]).sum())

    @property
    def depths(self) -> list[int]:
        return sorted(self.p)

    def draw(self, depth: int, size: int, gen: torch.Generator,
             focus: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, states, importance weights) for `size` examples at this depth."""
        focus = self.focus if focus is None else focus
        pick = torch.rand(size, generator=gen, dtype=torch.float64)
        targeted = torch.rand(size, generator=gen, dtype=torch.float64) < focus
        cdf_p, cdf_q = self.p_cdf[depth], self.q_cdf[depth]
        flat = torch.where(targeted, torch.searchsorted(cdf_q, pick * cdf_q[-1], right=True),
                           torch.searchsorted(cdf_p, pick * cdf_p[-1], right=True)).clamp(max=cdf_p.numel() - 1)
        weights = 1.0 / ((1.0 - focus) + focus * self.ratio[depth][flat])
        return flat // self.length, flat % self.length, weights.float()


# ---------------------------------------------------------------------------------------------------------------


def _heldout_examples(sampler: StateSampler, depth: int, examples: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed + depth)
    return sampler.draw(depth, examples, gen, focus=0.0)


HELDOUT_THRESHOLD = 0.9
OWN_PICKS = float("inf")
"""As an opening threshold: no position is sure, so the round writes only the base's most confident one and the
passes after it write the head's own picks: fixed-K ADJUST's passes (held-out kind "own")."""
UNTRAINED_DEPTH_OFF = 0.1
"""Held-out head/stale KL ratio above which a depth the head was not trained on (rollout..2*rollout-1, the passes
of K up to twice the rollout) is flagged: on the demo's template base the heads with fixed K=8 at 0.73 and 0.86
were at 0.54 and 0.18 at depth 7, two at 0.93-0.94 at 0.007-0.009, and four choice heads at 0.011-0.027 (one of
them, 0.82 at K=8, not flagged: docs/results.md §5). Also only above UNTRAINED_DEPTH_RELATIVE times the worst
trained depth's ratio in the K=1 order: an English head that is at 0.08-0.13 on every trained depth is at 0.12-0.16
beyond them."""
UNTRAINED_DEPTH_RELATIVE = 4.0
OWN_PICKS_OFF = 4.0
"""A head whose held-out KL ratio on its own picks (depth >= 2) is above this many times its ratio on the K=1
trajectory's order, and above 0.05, picks positions the K=1 sampler would not and is wrong there: on the demo's
template base such a head (own 0.22 vs K=1 order 0.001 at depth 2; heads that sampled well: within 1.2x) wrote
0.41-0.56 valid strings at K=3, 4 and 6 (docs/results.md §5)."""
CHECK_KINDS = ("own", "k1-deep")
"""Held-out kinds scored only in the final verdict, as checks: not in the training score."""
THRESHOLD_RANGE = (0.5, 0.95)
EXPLORED_RANKS = 3
KINDS = ("k1", "own", "threshold")
"""The kinds of training step: the K=1 order, fixed-K ADJUST's own passes, `adjust:threshold`'s passes."""
STALE_MEAN_DECAY = 0.99
OBJECTIVE = "kinds-scaled, after-norm from round 1, depths weighted 0.75"
"""Saved with a run's state: a run trained for another objective (listed below) is not resumed under it."""
EARLIER_OBJECTIVES = {
    "unscaled": "trained with each kind of step's loss unscaled (before 2026-12-05: see _kind_scale)",
    "kinds-scaled, after-norm from round 1": "weighted depth n by 0.5^(n-1) (the default until 2026-12-06, sixth "
                                             "session: see depth_probabilities)",
    "kinds-scaled, after-norm": "trained the update after the base's final norm from the first step (2026-12-06; "
                                "now it starts with round 1: see AdjustHeadConfig.after_norm)",
    "kinds-scaled": "trained a head without the update after the base's final norm (the default until 2026-12-06, "
                    "and again that afternoon)",
}


def explored_ranks(size: int, depth: int, gen: torch.Generator) -> torch.Tensor:
    """(size, depth) ranks of the positions the head's passes write in training: half the time the sampler's own
    pick (rank 0), else one of the head's EXPLORED_RANKS most confident. Near-tied positions swap as the head
    trains; a head taught only its current pick lost what to do when the other was written (choice: validity
    0.98 -> 0.63 for one head seed of two, docs/results.md §5)."""
    explore = torch.rand(size, depth, generator=gen) < 0.5
    return torch.where(explore, torch.randint(EXPLORED_RANKS, (size, depth), generator=gen), 0)


def step_positions(kind: str, size: int, depth: int,
                   gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(opening thresholds, explored ranks) for a training step of this kind (see `KINDS`): none for the K=1
    order, thresholds uniform in THRESHOLD_RANGE for `adjust:threshold`'s passes, OWN_PICKS for fixed-K ADJUST's."""
    if kind == "k1":
        return None, None
    if kind == "threshold":
        low, high = THRESHOLD_RANGE
        threshold = low + (high - low) * torch.rand(size, generator=gen)
    else:
        threshold = torch.full((size,), OWN_PICKS)
    return threshold, explored_ranks(size, depth, gen)


EVAL_BATCH = 64


@torch.no_grad()
def evaluate(loss_module: RolloutLoss, base: DiffusionLM, sampler: StateSampler, device: str,
             examples: int = 256, seed: int = 4321, threshold: float | None = None,
             min_depth: int = 1, accelerator: Accelerator | None = None) -> dict[int, dict[str, float]]:
    """Held-out KL(teacher || head) and KL(teacher || stale marginals) at every depth from `min_depth`, fixed
    uniform draws; with `threshold`, on the passes of `adjust:threshold` from those states. Without it, one
    rollout per state scores every depth: the states are drawn for the shallowest depth, and a deeper depth
    averages over those that still have a masked position there (uniform draws of that depth's examples, as
    before); 10 depths cost 10 head passes instead of 55.

    With an `accelerator` of several processes, each scores its share of the batches (of EVAL_BATCH states) and
    the batches' sums are added in the order one process adds them: every process gets one process's numbers,
    at 1/world of its cost (each process once scored every batch)."""
    depths = [d for d in sampler.depths if d >= min_depth]
    rollout = threshold is None
    parts = range(0, examples, EVAL_BATCH) if depths else range(0)
    # A unit of work: one batch of one depth (with `threshold`), or one batch scored at every depth (without).
    units = [(None, part) for part in parts] if rollout else [(d, part) for d in depths for part in parts]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = torch.arange(len(units)) % world == rank
    sums = torch.zeros(len(units), len(depths) if rollout else 1, 3, dtype=torch.float64)
    draws = {}
    for u, (depth, part) in enumerate(units):
        if not mine[u]:
            continue
        if depth not in draws:
            draws[depth] = _heldout_examples(sampler, depths[0] if depth is None else depth, examples, seed)
        rows, states, _ = draws[depth]
        sl = slice(part, part + EVAL_BATCH)
        if rollout:
            batch = make_batch(sampler.data, rows[sl], states[sl], depths[-1], base.spec.mask_id, device)
            scored = loss_module.per_depth(base, batch, depths)
        else:
            batch = make_batch(sampler.data, rows[sl], states[sl], depth, base.spec.mask_id, device,
                               threshold=torch.full((len(rows[sl]),), threshold))
            scored = [loss_module(base, batch)[2:]]
        for j, triple in enumerate(scored):
            sums[u, j] = torch.tensor([float(v.sum()) for v in triple], dtype=torch.float64)
    if world > 1:
        sums = _exchange_rows(sums, mine, accelerator)
    sums = sums.tolist()
    totals: dict[int, list[float]] = {d: [0.0, 0.0, 0.0] for d in depths}
    for u, (depth, _) in enumerate(units):
        for j, d in enumerate(depths if rollout else [depth]):
            totals[d] = [t + v for t, v in zip(totals[d], sums[u][j], strict=True)]
    return {d: {"head_kl": h / max(c, 1), "stale_kl": st / max(c, 1)} for d, (h, st, c) in totals.items()}


def _ratio_score(heldout: dict[str, dict[int, dict[str, float]]]) -> float:
    """Mean over kinds of state and depths of head/stale held-out KL (lower is better)."""
    ratios = [v["head_kl"] / v["stale_kl"] for kind in heldout.values() for v in kind.values() if v["stale_kl"] > 0]
    return sum(ratios) / len(ratios) if ratios else 0.0


LR_DECAY = 0.3
MIN_GAIN = 0.03
"""A held-out score less than 3% below the best so far does not count as progress."""


def _lr(step: int, lr: float, cfg: AdjustTrainConfig, decays: int = 0) -> float:
    return lr * LR_DECAY ** decays * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def _diagnostics(head: AdjustHead) -> dict[str, float]:
    """Gradient norms of the head's parts and the size of its output layer (why a head does or does not learn)."""
    parts = {"input": [head.proj, head.embed_norm, head.hidden_norm], "block": [head.block],
             "output": [head.out_norm] + ([head.after_norm] if head.after_norm is not None else [])}
    out = {}
    for name, modules in parts.items():
        grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
        out[f"grad_{name}"] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
    gain = head.out_norm.weight
    out["output_rms"] = float(gain.detach().float().pow(2).mean().sqrt())
    return out


@dataclass
class _Round:
    """What one round trains on."""

    index: int
    train: StateSampler
    heldout: dict[str, StateSampler]


def _onpolicy_config(base_cfg: TrajectoryConfig, cfg: AdjustTrainConfig, n: int, round_index: int,
                     head: AdjustHead | None) -> TrajectoryConfig:
    k = min(cfg.rollout, ONPOLICY_K)
    ks = tuple(sorted({2, k, 2 * k}))
    return replace(base_cfg, num=n, seed=base_cfg.seed + 7919 * (round_index + 1), policy_tokens_per_step=ks,
                   policy_head=None if head is None else head.fingerprint(), progress=cfg.progress,
                   shard_size=max(64, min(base_cfg.shard_size, n)),
                   policy_threshold=HELDOUT_THRESHOLD if head is not None and cfg.threshold_share > 0 else None)


def train_adjust(base: DiffusionLM, trajectories_dir: str | Path, out: str | Path,
                 cfg: AdjustTrainConfig) -> AdjustHead:
    """Train (or resume) an ADJUST head for `base` on trajectories collected from it, plus on-policy rounds."""
    from accelerate import Accelerator

    out = check_output_dir(out)
    started = time.time()
    data = load_trajectories(trajectories_dir)
    if data.fingerprint != base.fingerprint():
        raise ValueError(f"trajectories in {trajectories_dir} come from base {data.fingerprint}, "
                         f"not from this base ({base.fingerprint()})")
    if data.tokens.shape[1] < 2:
        raise ValueError("trajectories must have at least 2 generated tokens")
    if not getattr(base, "honours_padding", True) and len(set(data.prefix_len.tolist())) > 1:
        warnings.warn("this base's code ignores padding, and the trajectories' prompts differ in length: training "
                      "canvases are left-padded, so the head learns from logits that padding shifted (sampling "
                      "batches prompts by length and never pads); prefer prompts of one length", stacklevel=2)
    if cfg.rollout is None:
        cfg = replace(cfg, rollout=min(DEFAULT_ROLLOUT, data.length))
    elif cfg.rollout > data.length:
        raise ValueError(f"rollout={cfg.rollout} exceeds the {data.length} generated tokens of the trajectories")
    prompts = _prompts_of(trajectories_dir)

    if base.device.type == "cuda" and base.device.index is not None:
        torch.cuda.set_device(base.device)  # one process: accelerate's plain "cuda" is then the base's GPU
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    device = str(accelerator.device)
    if not _same_device(base.device, accelerator.device):
        # Under a launcher each process trains on its own GPU (accelerate's cuda:LOCAL_RANK), where its batches go.
        base = base.to(accelerator.device)
    base_fingerprint = base.fingerprint()
    state_path = out / STATE_FILE
    # The update after the final norm trains from round 1 (see the loop): a run of one round has none.
    head_config = replace(AdjustHeadConfig.for_base(base), after_norm=cfg.onpolicy_rounds > 1)
    lr = cfg.learning_rate(head_config.d_model)
    torch.manual_seed(cfg.seed)
    head = AdjustHead(head_config)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
    progress = {"step": 0, "round": 0, "round_step": 0, "best": None, "stale_evals": 0, "decays": 0,
                "stale_means": {}}
    anchor = "k1" if cfg.threshold_share + cfg.own_share < 1 else "own" if cfg.own_share > 0 else "threshold"
    identity = {"config": _comparable(asdict(cfg)), "base_fingerprint": base_fingerprint,
                "trajectories": _trajectory_identity(data, prompts), "num_processes": accelerator.num_processes,
                "objective": OBJECTIVE}
    best_state = None
    averaged = AdjustHead(head_config)
    averaged.load_state_dict(head.state_dict())
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        problems = _resume_problems(state, identity)
        trained = json.loads(state["progress"])["step"]
        if trained > cfg.max_steps:  # resuming would recompute the verdict of a head longer than asked for
            problems.append(f"trained {trained} steps there, max_steps={cfg.max_steps} now")
        if problems:
            raise MismatchedRunError(out, problems)
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        # clone(): a row saved as a view of the gathered (world, n) tensor keeps a storage offset, and
        # Generator.set_state reads such a tensor from the wrong place (invalid state or a crash).
        gen.set_state(state["generators"][accelerator.process_index].clone())
        progress = json.loads(state["progress"])
        best_state = state.get("best_head")
        averaged.load_state_dict(state.get("averaged_head", state["head"]))
    loss_module, optimizer = accelerator.prepare(RolloutLoss(head), optimizer)
    unwrapped = accelerator.unwrap_model(loss_module).head
    averaged = averaged.to(device).requires_grad_(False)
    averaged_loss = RolloutLoss(averaged)

    def average_step() -> None:
        """The moving average follows the raw weights; a short warm-up keeps it from lagging the first steps. At
        decay 0 the weight is 1, and lerp then copies the raw weights exactly."""
        weight = 1.0 - min(cfg.ema_decay, (1 + progress["step"]) / (10 + progress["step"]))
        for mean, param in zip(averaged.parameters(), unwrapped.parameters(), strict=True):
            mean.lerp_(param.detach(), weight)

    def restart_from(state: dict) -> None:
        unwrapped.load_state_dict(state)
        averaged.load_state_dict(state)
    depth_p = depth_probabilities(cfg.rollout)
    mask_id = base.spec.mask_id
    log = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / LOG_FILE, "a")

    def say(text: str) -> None:
        if accelerator.is_main_process and cfg.progress:
            tqdm.write(text, file=sys.stderr)

    def exported() -> AdjustHead:
        """The head a user gets: the best weights (by held-out KL) of the current round."""
        head_out = AdjustHead(head_config)
        head_out.threshold_share = cfg.threshold_share
        head_out.load_state_dict(best_state if best_state is not None else averaged.state_dict())
        return head_out.to(device).eval().requires_grad_(False)

    def checkpoint() -> None:
        # NCCL gathers only accelerator tensors; Generator.set_state takes them back on the CPU.
        gens = accelerator.gather_for_metrics(gen.get_state()[None].to(accelerator.device)).cpu() \
            if accelerator.num_processes > 1 else gen.get_state()[None]
        if accelerator.is_main_process:
            exported().save_pretrained(out, {"training": asdict(cfg), "step": progress["step"]})
            tmp = state_path.with_name(STATE_FILE + ".tmp")
            torch.save({"head": unwrapped.state_dict(), "averaged_head": averaged.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "generators": [g.clone() for g in gens], "step": progress["step"],
                        "progress": json.dumps(progress), "best_head": best_state, "config": asdict(cfg),
                        "base_fingerprint": base_fingerprint, "trajectories": identity["trajectories"],
                        "num_processes": accelerator.num_processes, "objective": OBJECTIVE}, tmp)
            os.replace(tmp, state_path)
        accelerator.wait_for_everyone()

    # Data: K=1 trajectories, then one on-policy collection per round (collected when the round starts).
    heldout_n = min(cfg.heldout, len(data) // 5)
    k1_train, k1_heldout = data.split(heldout_n) if heldout_n else (data, data)
    tables_dir = out / "stale"
    rank, world = accelerator.process_index, accelerator.num_processes

    def table_for(name: str, part: Trajectories, sweep: bool = True) -> torch.Tensor:
        if not sweep:
            return example_table(part, cfg.rollout)
        path = tables_dir / f"{name}.pt"
        if path.exists():
            table = torch.load(path, map_location="cpu", weights_only=True)
            if table.shape == (len(part), part.length, cfg.rollout - 1):
                return table
        table = stale_table(base, part, cfg.rollout, device, progress=cfg.progress and accelerator.is_main_process,
                            accelerator=accelerator)
        if accelerator.is_main_process:
            tables_dir.mkdir(parents=True, exist_ok=True)
            torch.save(table, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        return table

    sweep = cfg.focus > 0
    collections = [(k1_train, table_for("k1-train", k1_train, sweep))]
    heldouts = {"k1": StateSampler([k1_heldout], [table_for("k1-heldout", k1_heldout, False)], cfg.rollout, 0.0)}
    if cfg.threshold_share > 0:
        heldouts["threshold"] = heldouts["k1"]

    def collect_round(r: int, policy: AdjustHead | None) -> None:
        n = max(cfg.heldout + 8, int(len(data) * cfg.onpolicy_fraction))
        tcfg = _onpolicy_config(data.config, cfg, n, r, policy)
        directory = out / f"onpolicy-{r}"
        say(f"round {r}: collecting {n} on-policy trajectories "
            f"({'naive parallel' if policy is None else 'ADJUST with the head so far'}, "
            f"K in {tcfg.policy_tokens_per_step}) -> {directory}")
        collect_trajectories(base, directory, tcfg, prompts=prompts, rank=rank, world_size=world, head=policy)
        accelerator.wait_for_everyone()
        collected = load_trajectories(directory)
        held_n = min(cfg.heldout, len(collected) // 5)
        train_part, held_part = collected.split(held_n) if held_n else (collected, collected)
        collections.append((train_part, table_for(f"onpolicy-{r}-train", train_part, sweep)))
        heldouts["onpolicy"] = StateSampler([held_part], [table_for(f"onpolicy-{r}-heldout", held_part, False)],
                                            cfg.rollout, 0.0)
        if cfg.threshold_share > 0:
            heldouts["threshold-onpolicy"] = heldouts["onpolicy"]  # where the sampler's later steps start

    def start_round(r: int) -> _Round:
        sampler = StateSampler([c for c, _ in collections], [t for _, t in collections], cfg.rollout, cfg.focus)
        mass = ", ".join(f"depth {d}: {sampler.mass[d]:.0%}" for d in sampler.depths)
        say(f"round {r}: {len(sampler.data)} trajectories" +
            (f"; share of the stale KL in the top 10% of states: {mass}" if sweep else ""))
        return _Round(r, sampler, dict(heldouts))

    # Rebuild the rounds a resumed run has already passed through.
    rounds_total = cfg.onpolicy_rounds + (1 if cfg.onpolicy_rounds == 0 else 0)
    if cfg.onpolicy_rounds:
        collect_round(0, None)
    for r in range(1, progress["round"] + 1):
        # Round r was collected with the best head of round r-1, saved beside its collection.
        policy = AdjustHead(head_config).to(device)
        policy.load_state_dict(load_file(str(out / f"onpolicy-{r}" / POLICY_HEAD_FILE)))
        collect_round(r, policy.eval().requires_grad_(False))
    current = start_round(progress["round"])

    bar = tqdm(total=cfg.max_steps, initial=progress["step"], desc="train-adjust", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    running = None
    resumed_at = (progress["step"], progress["round"])

    def round_over() -> bool:
        # No "good enough" stop: ending a round once the head left 0.3% of the stale KL cost choice's K=8 0.967 ->
        # 0.980 and template's one-pass writes (docs/results.md §5); a round ends on the plateau or its cap.
        # A plateau ends the round only once its rate decays are spent (they happen at evaluations: one reached
        # before min_round_steps waits for the next evaluation past it).
        settled = (cfg.patience > 0 and progress["round_step"] >= cfg.min_round_steps
                   and progress["stale_evals"] >= cfg.patience and progress["decays"] >= cfg.lr_decays)
        return settled or (progress["round_step"] >= cfg.max_round_steps and current.index < rounds_total - 1)

    try:  # the bar's line ends even when a step fails, so an error message starts on its own line
        while True:
            while not (finished_round := round_over()) and progress["step"] < cfg.max_steps:
                for group in optimizer.param_groups:
                    group["lr"] = _lr(progress["step"], lr, cfg, progress["decays"])
                depth = int(torch.multinomial(depth_p, 1, generator=gen).item()) + 1
                depth = min(depth, max(current.train.depths))
                rows, states, weights = current.train.draw(depth, cfg.batch_size, gen)
                draw = float(torch.rand((), generator=gen)) if cfg.threshold_share + cfg.own_share > 0 else 1.0
                kind = ("threshold" if draw < cfg.threshold_share
                        else "own" if draw < cfg.threshold_share + cfg.own_share else "k1")
                threshold, pick_rank = step_positions(kind, cfg.batch_size, depth, gen)
                batch = make_batch(current.train.data, rows, states, depth, mask_id, device, weights, threshold,
                                   pick_rank)
                loss, stale, *_ = loss_module(base, batch)
                stale_value = stale.item()
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss * _kind_scale(progress, kind, anchor, _every_process(accelerator, kind,
                                                                                               stale_value)))
                diagnostics = None
                if (progress["step"] + 1) % cfg.eval_every == 0 and accelerator.is_main_process:
                    diagnostics = _diagnostics(unwrapped)
                if current.index == 0 and unwrapped.after_norm is not None:
                    # Round 0 trains the first update alone: with both from the start, one choice head seed of two
                    # stuck at held-out score 0.034 (validity 0.64-0.81; docs/results.md §2).
                    unwrapped.after_norm.weight.grad = None
                accelerator.clip_grad_norm_(loss_module.parameters(), cfg.grad_clip)
                optimizer.step()
                average_step()
                progress["step"] += 1
                progress["round_step"] += 1
                pair = (loss.item(), stale_value)
                running = pair if running is None else tuple(0.95 * a + 0.05 * b for a, b in zip(running, pair,
                                                                                                 strict=True))
                bar.update(1)
                bar.set_postfix(round=current.index, kl=f"{running[0]:.4f}", stale_kl=f"{running[1]:.4f}")
                if progress["step"] % cfg.eval_every == 0:
                    scores = {kind: evaluate(averaged_loss, base, sampler, device, cfg.heldout_examples,
                                              threshold=_kind_threshold(kind), accelerator=accelerator)
                              for kind, sampler in current.heldout.items()}
                    score = _ratio_score(scores)
                    improved = progress["best"] is None or score < progress["best"] * (1 - MIN_GAIN)
                    if progress["best"] is None or score < progress["best"]:
                        progress["best"] = score
                        best_state = {k: v.detach().cpu().clone() for k, v in averaged.state_dict().items()}
                    progress["stale_evals"] = 0 if improved else progress["stale_evals"] + 1
                    if (cfg.patience and progress["stale_evals"] >= cfg.patience and progress["decays"] < cfg.lr_decays
                            and progress["round_step"] >= cfg.min_round_steps):
                        # A plateau: go on from the best weights at a lower learning rate.
                        progress.update(decays=progress["decays"] + 1, stale_evals=0)
                        if best_state is not None:
                            restart_from(best_state)
                    entry = {"step": progress["step"], "round": current.index, "heldout": scores, "score": score,
                             "lr": _lr(progress["step"] - 1, lr, cfg, progress["decays"]),
                             "elapsed_s": round(time.time() - started, 1),
                             **(diagnostics or {})}
                    if log is not None:
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                        # Ratios only (the KLs are in the log): one short line per evaluation.
                        summary = "; ".join(f"{kind} " + " ".join(f"{v['head_kl'] / v['stale_kl']:.3f}"
                                                                  if v["stale_kl"] > 0 else "-" for v in s.values())
                                            for kind, s in scores.items())
                        if cfg.progress:
                            bar.write(f"step {progress['step']}: held-out KL head/stale at depths 1, 2, ...: "
                                      f"{summary} (score {score:.3f})", file=sys.stderr)
                if progress["step"] % cfg.save_every == 0 or progress["step"] == cfg.max_steps or round_over():
                    checkpoint()
            # A finished round goes on from its best weights, which collect the next round's states.
            next_round = current.index + 1
            if not finished_round or next_round >= rounds_total:
                break
            if best_state is not None:
                restart_from(best_state)
            policy = exported()
            if accelerator.is_main_process:
                (out / f"onpolicy-{next_round}").mkdir(parents=True, exist_ok=True)
                save_file({k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()},
                          str(out / f"onpolicy-{next_round}" / POLICY_HEAD_FILE))
            accelerator.wait_for_everyone()
            collect_round(next_round, policy)
            # The learning rate stays where the last round left it: back at the full rate after a plateau decay, the
            # held-out KL rose 3-6x at the round's start (docs/results.md §2).
            progress.update(round=next_round, round_step=0, best=None, stale_evals=0)
            current = start_round(next_round)
            checkpoint()
    finally:
        bar.close()
    head = exported()
    if resumed_at == (progress["step"], progress["round"]) and (out / VERDICT_FILE).exists():
        if log is not None:
            log.close()
        return head  # a finished run asked again: nothing to do, nothing rewritten
    checkpoint()
    k1_held = current.heldout["k1"].data
    deep = StateSampler([k1_held], [example_table(k1_held, 2 * cfg.rollout)], 2 * cfg.rollout, 0.0)
    final = {kind: evaluate(RolloutLoss(head), base, sampler, device, cfg.heldout_examples,
                            threshold=_kind_threshold(kind), accelerator=accelerator)
             for kind, sampler in {**current.heldout, "own": current.heldout["k1"]}.items()}
    final["k1-deep"] = evaluate(RolloutLoss(head), base, deep, device, cfg.heldout_examples,
                                min_depth=cfg.rollout, accelerator=accelerator)  # the rest is "k1"
    verdict = make_verdict(final, time.time() - started, progress["step"])
    if log is not None:
        log.write(json.dumps({"step": progress["step"], "round": current.index, "heldout": final, "final": True,
                              "score": _ratio_score({k: v for k, v in final.items() if k not in CHECK_KINDS}),
                              "elapsed_s": round(time.time() - started, 1)}) + "\n")
        log.close()
        atomic_write_text(out / VERDICT_FILE, json.dumps(verdict, indent=2))
    base_after = _recompute_fingerprint(base)
    if base_after != base_fingerprint:
        raise AssertionError("the base model changed during ADJUST training; it must stay frozen")
    return head


def _every_process(accelerator: Accelerator, kind: str, stale: float) -> list[tuple[str, float]]:
    """(kind, stale KL) of this step on every training process, in rank order: each process draws its own kind of
    step, and all of them keep the same running means from these (rank 0's are saved for all)."""
    if accelerator.num_processes == 1:
        return [(kind, stale)]
    mine = torch.tensor([[KINDS.index(kind), stale]], dtype=torch.float64, device=accelerator.device)
    return [(KINDS[int(k)], float(v)) for k, v in accelerator.gather(mine).tolist()]


def _kind_scale(progress: dict, kind: str, anchor: str, observed: list[tuple[str, float]]) -> float:
    """The factor that brings a step of this kind (K=1 order, fixed-K ADJUST's own passes, `adjust:threshold`'s
    passes) to the scale of the anchor kind's steps: the ratio of their running mean stale KLs, which `observed`
    (this step's (kind, stale KL) on every process) updates first. On the prompted tasks mix a threshold step's
    KL per masked position was 67x a K=1 step's (the threshold round leaves only the uncertain positions masked),
    its gradients 109x; Adam then scaled every step by the threshold steps' gradients and the head learned nothing
    elsewhere (shuffle at K=8: 0.50 against 0.97; docs/results.md §4). Brought to one scale, each kind carries its
    share of the steps, as `threshold_share` and `own_share` mean."""
    means = progress.setdefault("stale_means", {})
    for seen, stale in observed:
        means[seen] = stale if seen not in means else STALE_MEAN_DECAY * means[seen] + (1 - STALE_MEAN_DECAY) * stale
    if kind == anchor or means.get(anchor, 0.0) <= 0 or means.get(kind, 0.0) <= 0:
        return 1.0  # before both kinds were seen, or one has nothing to learn: no scale to match
    return means[anchor] / means[kind]


def _kind_threshold(kind: str) -> float | None:
    """Held-out states of kind "threshold" are scored on the passes of `adjust:threshold=0.9`, "own" on the
    passes of fixed-K ADJUST (the head's own picks)."""
    if kind == "own":
        return OWN_PICKS
    return HELDOUT_THRESHOLD if kind.startswith("threshold") else None


def make_verdict(heldout: dict[str, dict[int, dict[str, float]]], elapsed_s: float, steps: int) -> dict:
    """Held-out head/stale KL ratios per kind of state and depth, and whether the head learned."""
    ratios = {kind: {str(d): (v["head_kl"] / v["stale_kl"] if v["stale_kl"] > 0 else None) for d, v in s.items()}
              for kind, s in heldout.items()}
    most = {kind: max((v["stale_kl"] for v in s.values()), default=0.0) for kind, s in heldout.items()}
    weak = [f"{kind} depth {d}" for kind, s in heldout.items() for d, v in s.items()
            if kind != "k1-deep" and int(d) >= 2 and ratios[kind][str(d)] is not None
            and ratios[kind][str(d)] > LEARNED_LITTLE and v["stale_kl"] >= LITTLE_TO_LEARN * most[kind]]
    own, k1 = ratios.get("own", {}), ratios.get("k1", {})
    off = [f"depth {d}: {v:.3f} on its own picks, {k1[d]:.3f} in the K=1 order" for d, v in own.items()
           if int(d) >= 2 and v is not None and k1.get(d) is not None and v > max(0.05, OWN_PICKS_OFF * k1[d])]
    trained_worst = max((v for v in k1.values() if v is not None), default=0.0)
    untrained = [f"depth {d}: {v:.2f}" for d, v in ratios.get("k1-deep", {}).items()
                 if v is not None and v > max(UNTRAINED_DEPTH_OFF, UNTRAINED_DEPTH_RELATIVE * trained_worst)]
    return {"ratios": ratios, "heldout": heldout, "learned_little": weak, "own_picks_off": off,
            "untrained_depths_off": untrained, "steps": steps, "elapsed_s": round(elapsed_s, 1)}


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"


def format_verdict(verdict: dict) -> str:
    lines = ["held-out KL of the head / KL of the stale marginals (naive parallel); lower is better:"]
    for kind, ratios in verdict["ratios"].items():
        label = {"k1": "K=1 trajectory states", "own": "K=1 states, fixed-K ADJUST passes (the head's own picks)",
                 "k1-deep": "K=1 trajectory states, depths not trained on (K above the rollout)",
                 "threshold": "K=1 states, adjust:threshold=0.9 passes",
                 "threshold-onpolicy": "on-policy states, adjust:threshold=0.9 passes"}.get(
            kind, "on-policy states (K>1 sampler)")
        cells = ", ".join(f"depth {d}: {_ratio(v)}" for d, v in ratios.items())
        lines.append(f"  {label}: {cells}")
    lines.append(f"  {verdict['steps']} steps, {verdict['elapsed_s'] / 60:.1f} min")
    if verdict["learned_little"]:
        lines.append(f"warning: the head learned little ({', '.join(verdict['learned_little'])} above "
                     f"{LEARNED_LITTLE}); ADJUST will sample close to naive parallel. More or more varied "
                     "trajectories, or a longer run (--max-steps), may help.")
    if verdict.get("untrained_depths_off") and not verdict["learned_little"]:  # else the warning above says it
        lines.append(f"warning: at depths the head was not trained on, held-out KL is high "
                     f"({'; '.join(verdict['untrained_depths_off'])}); such heads lost validity at K=8 "
                     "(docs/results.md §5): use K up to the rollout, or train with a larger --rollout.")
    if verdict.get("own_picks_off"):
        lines.append(f"warning: the head is much worse on the positions it picks itself than in the K=1 order "
                     f"({'; '.join(verdict['own_picks_off'])}); such a head wrote invalid strings at some K "
                     "(docs/results.md §5): check its samples with `jointdlm eval`, or train another --seed.")
    return "\n".join(lines)


def _prompts_of(trajectories_dir: str | Path) -> list[str] | None:
    manifest = json.loads((Path(trajectories_dir) / "manifest.json").read_text())
    return manifest.get("prompts")


def _comparable(config: dict) -> dict:
    """Fields that may change between a run and its resumption do not count."""
    return {k: v for k, v in config.items() if k not in ("progress", "max_steps", "eval_every", "save_every")}


def _trajectory_identity(data: Trajectories, prompts: list[str] | None = None) -> dict:
    """What makes a trajectory collection the same data (its progress flag does not), prompts included: two
    collections of one config from different prompt files are different data."""
    # `chat` joined the config later: off, it is left out, so heads saved before it still match; so are prompts
    # when there are none.
    identity = {"fingerprint": data.fingerprint, **{k: v for k, v in asdict(data.config).items()
                                                    if k not in ("progress", "batch_size")
                                                    and not (k == "chat" and not v)}}
    if prompts is not None:
        identity["prompts"] = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    return json.loads(json.dumps(identity))


BEFORE_THE_FIELD = {"ema_decay": 0.0}
"""What a run saved before a field existed ran with, where that is not today's default."""


def _same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are one (a CUDA device without an index is the current one)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    return (a.index if a.index is not None else torch.cuda.current_device()) == \
        (b.index if b.index is not None else torch.cuda.current_device())


def _resume_problems(state: dict, wanted: dict) -> list[str]:
    """Why a saved trainer state cannot be continued by this run (empty when it can)."""
    problems = []
    defaults = {**{f.name: f.default for f in fields(AdjustTrainConfig)}, **BEFORE_THE_FIELD}
    old_cfg, new_cfg = _comparable(state["config"]), wanted["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        old = old_cfg.get(key, defaults.get(key))
        if old != new_cfg.get(key):
            problems.append(f"{key}={old!r} there, {new_cfg.get(key)!r} now")
    if state.get("base_fingerprint", wanted["base_fingerprint"]) != wanted["base_fingerprint"]:
        problems.append(f"base model {state['base_fingerprint']} there, {wanted['base_fingerprint']} now")
    saved = json.loads(json.dumps(state.get("trajectories", wanted["trajectories"])))
    saved.pop("batch_size", None)  # recorded by earlier versions; it never changed the data
    wanted_data = dict(wanted["trajectories"])
    if "prompts" not in saved:  # saved before the prompts were part of the identity: not known, not compared
        wanted_data.pop("prompts", None)
    if saved != wanted_data:
        problems.append("trained on a different trajectory collection")
    objective = state.get("objective", "unscaled")
    if objective != wanted["objective"]:
        problems.append(EARLIER_OBJECTIVES.get(objective, f"trained for the objective {objective!r}"))
    saved_procs = state.get("num_processes", len(state["generators"]))
    if saved_procs != wanted["num_processes"]:
        problems.append(f"{saved_procs} training process(es) there, {wanted['num_processes']} now")
    return problems


def _recompute_fingerprint(base: DiffusionLM) -> str:
    if hasattr(base, "_fingerprint"):
        base._fingerprint = None
    return base.fingerprint()


def final_heldout(out: str | Path) -> dict | None:
    """The last held-out evaluation of K=1 trajectory states written by a training run."""
    path = Path(out) / LOG_FILE
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    heldout = lines[-1]["heldout"]
    return heldout.get("k1", heldout)


def read_verdict(out: str | Path) -> dict | None:
    path = Path(out) / VERDICT_FILE
    return json.loads(path.read_text()) if path.exists() else None
