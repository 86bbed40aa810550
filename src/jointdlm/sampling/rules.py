"""Unmasking rules (which masked positions to fill) and token sampling (what to write there).

Positions are chosen from the model's own (untempered) distribution; tokens are drawn from the tempered,
top-k / top-p truncated one by inverting its cumulative distribution in float64 at one uniform per drawn position.

Randomness is counter-based: at every step the loop draws one seed per row from that row's generator, and
the noise at a position is a function of (step seed, position, stream) only. So a sample never depends on
the batch it was generated in, and two samplers that write the same position at the same step under the
same distribution write the same token, whatever order they visit positions in (an untrained ADJUST head
reproduces naive parallel token for token).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

RULES = ("confidence", "margin", "entropy", "random", "left_to_right")
POSITIONAL_RULES = ("random", "left_to_right")
"""The rules that rank positions without reading the log-probabilities."""
_MASK64 = (1 << 64) - 1
RANDOM_RULE_STREAM = -1
NOISE_CHUNK = 1 << 18
"""Most values (rows x vocabulary) worked on at once on a CPU: a chunk's passes then stay in the caches (for the
Gumbel noise draws once used, 1.6x faster than chunks of 1 << 22 on 2 cores: docs/results.md §6), and memory stays
bounded at large vocabularies. Draws, log-probabilities and a head pass's scores work in chunks of this size."""
NOISE_CHUNK_ACCELERATOR = 1 << 22
"""The same on a GPU, where bandwidth is plenty and each chunk's launches cost: fewer, larger chunks."""
READS_ONLY_THE_TOP = ("confidence",)
"""The rules whose score needs only a position's top probability (`top_probability`), not its log-probabilities."""


def chunk_rows(width: int, device: torch.device) -> int:
    """Rows of `width` values (a vocabulary) that one chunk holds on `device` (at least one)."""
    return max(1, (NOISE_CHUNK if device.type == "cpu" else NOISE_CHUNK_ACCELERATOR) // max(1, width))


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 finaliser applied per value)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def _mix64_(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser in place on int64 z (multiplication wraps, as two's complement does; shifts are
    logical: torch's >> is arithmetic, so the sign bits are masked off), with a scratch tensor of its shape. The
    (rows x vocabulary) noise is the bulk of a fast sampler's time on small bases; in place it allocates nothing
    per operation."""
    for k, factor in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, k, out=scratch)
        z.bitwise_xor_(scratch.bitwise_and_((1 << (64 - k)) - 1))
        if factor is not None:
            z.mul_(factor)
    return z


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """`_mix64_` on a copy."""
    return _mix64_(z.clone(), torch.empty_like(z))


def _noise_rows(step_seeds: torch.Tensor, positions: torch.Tensor, size: int, stream: int,
                gumbel: bool) -> torch.Tensor:
    """(n, size) float64 uniforms in (0, 1), or Gumbel noise -log(-log(u)) of them: entry (i, v) depends only on
    (step_seeds[i], positions[i], stream, v), computed as integer hashing on tensors (no generator per position,
    no Python per element), in chunks of at most NOISE_CHUNK values."""
    step_seeds, positions = step_seeds.to(torch.int64), positions.to(torch.int64)
    stream_term = _signed((stream * 0x94D049BB133111EB + 0x9E3779B97F4A7C15) & _MASK64)
    key = _mix64(step_seeds * _GOLDEN + _mix64(positions * _MIX1 + stream_term))
    out = torch.empty(len(key), size, dtype=torch.float64, device=key.device)
    per_id = (torch.arange(size, dtype=torch.int64, device=key.device) + 1) * _GOLDEN
    rows_per_chunk = max(1, min(len(key), chunk_rows(size, key.device)))
    z_buffer = torch.empty(rows_per_chunk, size, dtype=torch.int64, device=key.device)
    scratch_buffer = torch.empty_like(z_buffer)
    for first in range(0, len(key), rows_per_chunk):
        rows = key[first:first + rows_per_chunk]
        z, scratch = z_buffer[:len(rows)], scratch_buffer[:len(rows)]
        _mix64_(torch.add(rows[:, None], per_id[None, :], out=z), scratch)
        torch.bitwise_right_shift(z, 11, out=scratch)
        chunk = out[first:first + rows_per_chunk]
        chunk.copy_(scratch.bitwise_and_((1 << 53) - 1)).add_(0.5).mul_(2.0 ** -53)
        if gumbel:
            chunk.log_().neg_().log_().neg_()
    return out


def uniform_grid(step_seeds: torch.Tensor, positions: torch.Tensor, size: int, stream: int = 0) -> torch.Tensor:
    """(n, size) float64 uniforms in (0, 1): entry (i, v) depends only on (step_seeds[i], positions[i], stream,
    v)."""
    return _noise_rows(step_seeds, positions, size, stream, gumbel=False)


def gumbel_grid(step_seeds: torch.Tensor, positions: torch.Tensor, size: int, stream: int = 0) -> torch.Tensor:
    """(n, size) float64 Gumbel noise -log(-log(u)) of `uniform_grid`'s uniforms, computed in place: the noise of
    the Gumbel-max draws before `draw` inverted the cumulative distribution (kept for benchmarks/draw_speed.py and
    exact_speedups.py, whose references draw with it)."""
    return _noise_rows(step_seeds, positions, size, stream, gumbel=True)


def uniform_noise(step_seed: int, position: int, size: int, stream: int = 0) -> torch.Tensor:
    """float64 uniforms in (0, 1) that depend only on (step seed, position, stream)."""
    return uniform_grid(torch.tensor([step_seed]), torch.tensor([position]), size, stream)[0]


def model_logprobs(logits: torch.Tensor, banned: Sequence[int], overwrite: bool = False) -> torch.Tensor:
    """Log-probabilities with never-sampled ids (mask, BOS) removed. With `overwrite` the banned ids are set in
    `logits` itself (a float32 tensor the caller will not read again), saving a copy of it."""
    logits = without_banned(logits, banned, overwrite)
    if logits.device.type != "cpu" or logits.dim() != 2:
        return torch.log_softmax(logits, dim=-1)
    # On a CPU in place, a chunk of rows at a time: a fresh (positions x vocabulary) output per step is memory
    # handed back to the system and faulted in again at the next (docs/results.md §6).
    for part in logits.split(chunk_rows(logits.shape[-1], logits.device)):
        part.copy_(torch.log_softmax(part, dim=-1))
    return logits


def without_banned(logits: torch.Tensor, banned: Sequence[int], overwrite: bool = False) -> torch.Tensor:
    """float32 logits with never-sampled ids at -inf (in `logits` itself with `overwrite`)."""
    logits = logits.float() if overwrite else logits.float().clone()
    return logits.index_fill_(-1, _id_tensor(tuple(banned), logits.device), -torch.inf)


def top_probability(logits: torch.Tensor) -> torch.Tensor:
    """(...) the largest probability of softmax(logits) over the last dimension: the confidence rule's score, as
    `marginal_scores(log_softmax(logits), "confidence")` up to rounding, without writing every log-probability
    (an ADJUST head pass scores its candidates x vocabulary this way and needs log-probabilities at one)."""
    rows = logits.reshape(-1, logits.shape[-1])
    # A chunk of rows at a time: a fresh (candidates x vocabulary) temporary per pass cost 2-3 ms on a CPU (memory
    # handed back and faulted in again each time), a chunk's stays in the caches.
    sums = [torch.sub(part, part.amax(dim=-1, keepdim=True)).exp_().sum(-1)
            for part in rows.split(chunk_rows(rows.shape[-1], rows.device))]
    return torch.cat(sums).log_().neg_().exp_().view(logits.shape[:-1])


@functools.lru_cache(maxsize=64)
def _id_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The ids as a tensor on `device`, made once: indexing with a Python list copies it to the device every call
    (and a CUDA graph cannot capture that copy)."""
    return torch.tensor(ids, dtype=torch.long, device=device)


class Marginals:
    """Log-probabilities at some positions only: row i of `values` (N, V) describes the i-th True position of
    `where` (B, T), in row-major order. A step reads only its masked positions, and on small bases a full
    (B, T, V) tensor per step cost as much as the model pass itself."""

    def __init__(self, where: torch.Tensor, values: torch.Tensor) -> None:
        if values.dim() != 2 or values.shape[0] != int(where.sum()):
            raise ValueError(f"{tuple(values.shape)} log-probabilities for {int(where.sum())} positions")
        self.where, self.values = where, values
        self.index = torch.full(where.shape, -1, dtype=torch.long, device=where.device)
        self.index[where] = torch.arange(values.shape[0], device=where.device)

    def at(self, mask: torch.Tensor) -> torch.Tensor:
        """(M, V) rows for the True positions of `mask` (B, T), which must lie inside `where`."""
        rows = self.index[mask]
        if (rows < 0).any():
            raise ValueError("asked for log-probabilities at a position that was not computed")
        return self.values[rows.to(self.values.device)]

    def rows_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, V): for each row b the log-probabilities at position positions[b] (rows where it was not computed
        get some computed row: mask them out). Unlike `at`, no shape depends on the data (no wait on a GPU)."""
        rows = self.index.gather(1, positions[:, None]).squeeze(1).clamp(min=0)
        return self.values[rows.to(self.values.device)]


def position_scores(logprobs: Marginals, rule: str, eligible: torch.Tensor,
                    step_seeds: Sequence[int], offsets: Sequence[int] | None = None) -> torch.Tensor:
    """(B, T) float64 scores, higher = unmask sooner; -inf where a position may not be filled (`eligible` lies
    inside the positions the log-probabilities were computed at)."""
    computed = marginal_scores(logprobs.values, rule)
    if computed is None:
        scores = positional_scores(rule, eligible.shape, step_seeds, offsets, eligible.device)
    else:
        scores = torch.full(eligible.shape, -torch.inf, dtype=torch.float64, device=eligible.device)
        scores[logprobs.where.to(eligible.device)] = computed.to(torch.float64).to(eligible.device)
    return scores.masked_fill(~eligible, -torch.inf)


def marginal_scores(lp: torch.Tensor, rule: str) -> torch.Tensor | None:
    """(...) scores of positions from their log-probabilities (..., V) by a rule that reads them; None for the
    rules that do not (`positional_scores`)."""
    if rule == "confidence":
        return lp.max(dim=-1).values.exp()
    if rule == "margin":
        top2 = lp.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    if rule == "entropy":
        return (lp.exp() * lp.clamp(min=-1e30)).nan_to_num(0.0).sum(-1)
    if rule in POSITIONAL_RULES:
        return None
    raise ValueError(f"unknown unmasking rule {rule!r}; choose from {', '.join(RULES)}")


def positional_scores(rule: str, shape: torch.Size, step_seeds: Sequence[int], offsets: Sequence[int] | None,
                      device: torch.device) -> torch.Tensor:
    """(B, T) float64 scores of every position by a rule that does not read the log-probabilities."""
    if rule == "random":
        offsets = offsets or [0] * len(step_seeds)
        return torch.stack([torch.cat([torch.zeros(off, dtype=torch.float64),
                                       uniform_noise(seed, RANDOM_RULE_STREAM, shape[1] - off)])
                            for seed, off in zip(step_seeds, offsets, strict=True)]).to(device)
    if rule == "left_to_right":
        return -torch.arange(shape[1], dtype=torch.float64, device=device).expand(shape)
    raise ValueError(f"the {rule!r} rule reads log-probabilities")


def rank_of(scores: torch.Tensor) -> torch.Tensor:
    """(B, T) rank of each position by descending score, ties broken by position (0 = best)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))


def select_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T): the `counts[b]` best-scoring positions of each row (ties broken by position)."""
    return (rank_of(scores) < counts[:, None]) & torch.isfinite(scores)


def truncate(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Tempered, truncated scores over the last dimension (float64) whose softmax is the distribution to draw from.
    With nothing cut they are the tempered logits as they are: `inverse_cdf` draws from their softmax whatever
    constant a row is shifted by, so no normalisation pass over every sampled position's vocabulary is needed.
    With both top-k and top-p, top-p reads the tempered probabilities as they were before top-k (not renormalised
    over the k kept): the intersection of the two sets, as Dream's sampler keeps, which can keep more than Hugging
    Face's top-k-then-top-p."""
    if (top_k <= 0 or top_k >= logits.shape[-1]) and top_p >= 1.0:
        return logits.double() if temperature == 1 else logits.double() / temperature
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


def sample_at(logprobs: Marginals, fill: torch.Tensor, step_seeds: Sequence[int],
              temperature: float, top_k: int, top_p: float, stream: int = 0,
              offsets: Sequence[int] | None = None) -> torch.Tensor:
    """Token ids (B, T) drawn at the `fill` positions (other entries are 0).

    `logprobs` already has banned ids at -inf and covers every `fill` position. Temperature 0 is greedy. A
    different `stream` gives independent draws at the same positions (e.g. several proposals in one step).
    `offsets` (left padding per row) make the noise follow a row's own positions, not the batch's padded layout.
    All sampled positions of all rows are drawn at once.
    """
    tokens = torch.zeros(fill.shape, dtype=torch.long, device=fill.device)
    rows, positions = fill.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return tokens
    lp = logprobs.at(fill)
    seeds, shift = row_keys(step_seeds, offsets, lp.device)
    tokens[rows, positions] = draw(lp, seeds[rows], positions.to(lp.device) - shift[rows], temperature, top_k, top_p,
                                   stream).to(tokens.device)
    return tokens


def row_keys(step_seeds: Sequence[int], offsets: Sequence[int] | None,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int64 step seeds and left paddings on `device`: what `draw` keys each row's noise by."""
    seeds = torch.tensor(list(step_seeds), dtype=torch.int64, device=device)
    shift = torch.tensor(list(offsets) if offsets else [0] * len(step_seeds), dtype=torch.int64, device=device)
    return seeds, shift


def draw(lp: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, temperature: float, top_k: int,
         top_p: float, stream: int = 0) -> torch.Tensor:
    """(n,) token ids, one from each row of log-probabilities `lp` (n, V), drawn with the noise of (seeds[i],
    positions[i], stream): a row's own position, left padding removed."""
    if temperature == 0:
        return lp.argmax(-1)
    # Inverse CDF at one uniform of (seed, position, stream) per row: a float64 exp and cumulative sum over the
    # vocabulary, where Gumbel-max hashed a noise value per entry (naive K=48 on the demo's English base ran 1.48x
    # faster as a whole: docs/results.md §6). A chunk of rows at a time, so a chunk's float64 rows stay in the
    # caches; the uniforms hashed once for all rows (per chunk, their small calls cost more than the sums).
    rows = chunk_rows(lp.shape[-1], lp.device)
    uniforms = uniform_grid(seeds, positions, 1, stream)
    drawn = [inverse_cdf(truncate(lp[first:first + rows], temperature, top_k, top_p), uniforms[first:first + rows])
             for first in range(0, max(1, len(lp)), rows)]
    return torch.cat(drawn)


def inverse_cdf(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """(n,) the token of each row of float64 `scores` (n, V) (log-probabilities up to a constant; -inf = never) at
    which the cumulative distribution of softmax(scores) first exceeds that row's uniform in (0, 1) (n, 1). The
    target stays below the total by a relative 2**-52, so a rounding of u x total up to the total cannot land on the
    cut tail (tokens at -inf add nothing to the sum, and are never first to exceed it)."""
    cdf = (scores - scores.amax(-1, keepdim=True)).exp_().cumsum_(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms * total, total * (1 - 2.0 ** -52))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)
