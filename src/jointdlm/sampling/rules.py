"""Unmasking rules (which masked positions to fill) and token sampling (what to write there).

Positions are chosen from the model's own (untempered) distribution; tokens are drawn from the tempered,
top-k / top-p truncated one with Gumbel-max noise in float64, each row from its own seeded generator so a
sample never depends on the batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RULES = ("confidence", "margin", "entropy", "random", "left_to_right")


def model_logprobs(logits: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    """Log-probabilities with never-sampled ids (mask, BOS) removed."""
    logits = logits.float().clone()
    logits[..., list(banned)] = -torch.inf
    return torch.log_softmax(logits, dim=-1)


def position_scores(logprobs: torch.Tensor, rule: str, eligible: torch.Tensor,
                    generators: Sequence[torch.Generator]) -> torch.Tensor:
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
        scores = torch.stack([torch.rand(logprobs.shape[1], generator=g, dtype=torch.float64) for g in generators])
    elif rule == "left_to_right":
        scores = -torch.arange(logprobs.shape[1], dtype=torch.float64).expand(logprobs.shape[:2])
    else:
        raise ValueError(f"unknown unmasking rule {rule!r}; choose from {', '.join(RULES)}")
    scores = scores.to(torch.float64).to(eligible.device)
    return scores.masked_fill(~eligible, -torch.inf)


def select_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T): the `counts[b]` best-scoring positions of each row (ties broken by position)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (ranks < counts[:, None]) & torch.isfinite(scores)


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


def sample_at(logprobs: torch.Tensor, fill: torch.Tensor, generators: Sequence[torch.Generator],
              temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Token ids (B, T) drawn at the `fill` positions (other entries are 0).

    `logprobs` already has banned ids at -inf. Temperature 0 is greedy.
    """
    tokens = torch.zeros(fill.shape, dtype=torch.long, device=fill.device)
    for row, gen in enumerate(generators):
        positions = fill[row].nonzero().squeeze(-1)
        if positions.numel() == 0:
            continue
        row_lp = logprobs[row, positions]
        if temperature == 0:
            tokens[row, positions] = row_lp.argmax(-1)
            continue
        lp = truncate(row_lp, temperature, top_k, top_p)
        uniform = torch.rand(lp.shape, generator=gen, dtype=torch.float64).clamp_(min=1e-300)
        gumbel = -torch.log(-torch.log(uniform))
        tokens[row, positions] = (lp.cpu() + gumbel).argmax(-1).to(tokens.device)
    return tokens
