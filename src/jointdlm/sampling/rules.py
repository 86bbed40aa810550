"""Unmasking rules (which masked positions to fill) and token sampling (what to write there).

Positions are chosen from the model's own (untempered) distribution; tokens are drawn from the tempered,
top-k / top-p truncated one with Gumbel-max noise in float64.

Randomness is counter-based: at every step the loop draws one seed per row from that row's generator, and
the noise at a position is a function of (step seed, position, stream) only. So a sample never depends on
the batch it was generated in, and two samplers that write the same position at the same step under the
same distribution write the same token, whatever order they visit positions in (an untrained ADJUST head
reproduces naive parallel token for token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RULES = ("confidence", "margin", "entropy", "random", "left_to_right")
_MASK64 = (1 << 64) - 1
RANDOM_RULE_STREAM = -1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 finaliser applied per value)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def uniform_noise(step_seed: int, position: int, size: int, stream: int = 0) -> torch.Tensor:
    """float64 uniforms in (0, 1) that depend only on (step seed, position, stream)."""
    gen = torch.Generator().manual_seed(mix_seed(step_seed, position, stream))
    return torch.rand(size, generator=gen, dtype=torch.float64).clamp_(min=1e-300)


def gumbel_noise(step_seed: int, positions: Sequence[int], size: int, stream: int = 0) -> torch.Tensor:
    """(len(positions), size) float64 Gumbel noise, one independent row per position."""
    if not len(positions):
        return torch.empty(0, size, dtype=torch.float64)
    uniform = torch.stack([uniform_noise(step_seed, int(p), size, stream) for p in positions])
    return -torch.log(-torch.log(uniform))


def model_logprobs(logits: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    """Log-probabilities with never-sampled ids (mask, BOS) removed."""
    logits = logits.float().clone()
    logits[..., list(banned)] = -torch.inf
    return torch.log_softmax(logits, dim=-1)


def position_scores(logprobs: torch.Tensor, rule: str, eligible: torch.Tensor,
                    step_seeds: Sequence[int], offsets: Sequence[int] | None = None) -> torch.Tensor:
    """(B, T) float64 scores, higher = unmask sooner; -inf where a position may not be filled."""
    if rule == "confidence":
        scores = logprobs.max(dim=-1).values.exp()
    elif rule == "margin":
        top2 = logprobs.topk(2, dim=-1).values.exp()
        scores = top2[..., 0] - top2[..., 1]
    elif rule == "entropy":
        probs = logprobs.exp()
        scores = (probs * logprobs.clamp(min=-1e30)).nan_to_num(0.0).sum(-1)
    elif rule == "random":
        width = logprobs.shape[1]
        offsets = offsets or [0] * len(step_seeds)
        scores = torch.stack([torch.cat([torch.zeros(off, dtype=torch.float64),
                                         uniform_noise(seed, RANDOM_RULE_STREAM, width - off)])
                              for seed, off in zip(step_seeds, offsets, strict=True)])
    elif rule == "left_to_right":
        scores = -torch.arange(logprobs.shape[1], dtype=torch.float64).expand(logprobs.shape[:2])
    else:
        raise ValueError(f"unknown unmasking rule {rule!r}; choose from {', '.join(RULES)}")
    scores = scores.to(torch.float64).to(eligible.device)
    return scores.masked_fill(~eligible, -torch.inf)


def rank_of(scores: torch.Tensor) -> torch.Tensor:
    """(B, T) rank of each position by descending score, ties broken by position (0 = best)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))


def select_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T): the `counts[b]` best-scoring positions of each row (ties broken by position)."""
    return (rank_of(scores) < counts[:, None]) & torch.isfinite(scores)


def truncate(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Tempered, truncated log-probabilities over the last dimension."""
    lp = torch.log_softmax(logits.double() / temperature, dim=-1)
    if top_k > 0 and top_k < lp.shape[-1]:
        kth = lp.topk(top_k, dim=-1).values[..., -1:]
        lp = lp.masked_fill(lp < kth, -torch.inf)
    if top_p < 1.0:
        sorted_lp, idx = lp.sort(dim=-1, descending=True)
        before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
        drop = torch.zeros_like(lp, dtype=torch.bool).scatter(-1, idx, before >= top_p)
        lp = lp.masked_fill(drop, -torch.inf)
    return torch.log_softmax(lp, dim=-1)


def sample_at(logprobs: torch.Tensor, fill: torch.Tensor, step_seeds: Sequence[int],
              temperature: float, top_k: int, top_p: float, stream: int = 0,
              offsets: Sequence[int] | None = None) -> torch.Tensor:
    """Token ids (B, T) drawn at the `fill` positions (other entries are 0).

    `logprobs` already has banned ids at -inf. Temperature 0 is greedy. A different `stream` gives
    independent draws at the same positions (e.g. several proposals in one step). `offsets` (left padding
    per row) make the noise follow a row's own positions, not the batch's padded layout.
    """
    offsets = offsets or [0] * len(step_seeds)
    tokens = torch.zeros(fill.shape, dtype=torch.long, device=fill.device)
    for row, seed in enumerate(step_seeds):
        positions = fill[row].nonzero().squeeze(-1)
        if positions.numel() == 0:
            continue
        row_lp = logprobs[row, positions]
        if temperature == 0:
            tokens[row, positions] = row_lp.argmax(-1)
            continue
        lp = truncate(row_lp, temperature, top_k, top_p)
        gumbel = gumbel_noise(seed, (positions - offsets[row]).tolist(), lp.shape[-1], stream)
        tokens[row, positions] = (lp.cpu() + gumbel).argmax(-1).to(tokens.device)
    return tokens
