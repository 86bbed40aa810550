"""Evaluation numbers that each carry a 95% interval, so a difference between samplers can be told
apart from the noise of a few hundred samples.

Which interval fits depends on the number: Wilson for rates (well behaved near 0 and 1, unlike the
normal approximation), a percentile bootstrap for means, a bootstrap spread for total variation, and
the range over k-means seeds for MAUVE, whose main noise at these sample sizes is the quantisation.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from jointdlm.data.tasks import TaskExample, score_all
from jointdlm.data.toy import ToyLanguage, normalize, tv_distance

if TYPE_CHECKING:
    from jointdlm.models.causal import CausalScorer
    from jointdlm.models.protocol import DiffusionLM

Z_95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A point value with a 95% interval, the number of observations behind it and how it was made."""

    value: float
    low: float
    high: float
    n: int
    method: str

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.2f}, {self.high:.2f}]"


def _as_array(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{what} needs at least one value")
    return array


def bootstrap(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap: no assumption on the shape of the values' distribution."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    array = _as_array(values, "bootstrap")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, array.size, size=(n_boot, array.size))
    stats = np.array([statistic(array[row]) for row in draws], dtype=np.float64)
    low, high = np.percentile(stats, [2.5, 97.5])
    value = float(statistic(array))
    return Estimate(value, float(low), float(high), int(array.size), f"percentile bootstrap ({n_boot})")


def proportion(successes: Sequence[bool]) -> Estimate:
    """Rate of successes with a Wilson score interval, which stays inside [0, 1] and is not empty at 0 or n."""
    flags = [bool(s) for s in successes]
    n = len(flags)
    if n == 0:
        raise ValueError("proportion needs at least one outcome")
    p = sum(flags) / n
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return Estimate(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)), n, "wilson")


def validity(lang: ToyLanguage, texts: Sequence[str]) -> Estimate:
    """Share of texts in the language's support."""
    return proportion([lang.is_valid(t) for t in texts])


def total_variation(lang: ToyLanguage, texts: Sequence[str], n_boot: int = 200, seed: int = 0) -> Estimate:
    """Plug-in TV distance to the exact distribution, with the bootstrap's spread placed around it.

    Resampling piles a second round of finite-sample bias on top of the plug-in value (fewer distinct
    strings, so a larger TV), which shifts the percentile interval upward, sometimes past the value
    itself. Only the spread is kept: interval = value minus/plus the distances of the bootstrap's 2.5
    and 97.5 percentiles from its median. The plug-in value itself still grows as the sample shrinks,
    so compare samplers at equal sample sizes.
    """
    texts = list(texts)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    value = tv_distance(lang, texts)
    stats = _bootstrap_tv(lang, texts, n_boot, seed)
    low, mid, high = np.percentile(stats, [2.5, 50, 97.5])
    return Estimate(
        value,
        float(max(0.0, value - (mid - low))),
        float(min(1.0, value + (high - mid))),
        len(texts),
        f"bootstrap spread around plug-in ({n_boot})",
    )


def _bootstrap_tv(lang: ToyLanguage, texts: list[str], n_boot: int, seed: int) -> np.ndarray:
    """TV of each resample, from counts over the distinct texts rather than by re-checking every text."""
    distinct: dict[str, int] = {}
    ids = np.array([distinct.setdefault(normalize(t), len(distinct)) for t in texts])
    probs = np.exp([lang.log_prob(t) for t in distinct])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    freqs = np.stack([np.bincount(ids[row], minlength=len(distinct)) for row in draws]) / len(ids)
    seen = freqs > 0
    unseen_mass = np.clip(1.0 - (probs * seen).sum(axis=1), 0.0, None)
    return 0.5 * ((np.abs(freqs - probs) * seen).sum(axis=1) + unseen_mass)


def nll(scorer: CausalScorer, texts: Sequence[str], seed: int = 0) -> Estimate:
    """Mean over texts of the scorer's per-token NLL (nats), so long and short texts weigh the same."""
    texts = list(texts)
    if not texts:
        raise ValueError("nll needs at least one text")
    return bootstrap(scorer.nll(texts), seed=seed)


def token_entropy(token_ids: Sequence[Sequence[int]], seed: int = 0) -> Estimate:
    """Mean over samples of the entropy (nats) of each sample's own token frequencies.

    The field's companion to generative NLL: repetitive text ("the the the ...") scores a low NLL under any LM,
    so a sampler can look better by degenerating; its samples' entropy then falls below K=1's (Zheng et al.,
    2024, found this in MDLM's reported perplexities). An empty sample has entropy 0."""
    values = []
    for ids in token_ids:
        counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)[1]
        p = counts / counts.sum() if counts.size else counts
        values.append(float(-(p * np.log(p)).sum()))
    return bootstrap(values, seed=seed)


def entropy(scorer: CausalScorer, texts: Sequence[str], seed: int = 0) -> Estimate:
    """`token_entropy` of the texts in the scorer's tokens (the tokens its NLL is measured on, EOS left out)."""
    texts = list(texts)
    if not texts:
        raise ValueError("entropy needs at least one text")
    return token_entropy([scorer.tokenizer.encode(t) for t in texts], seed=seed)


def sample_length(scorer: CausalScorer, texts: Sequence[str], seed: int = 0) -> Estimate:
    """Mean number of the scorer's tokens per text: a sample's entropy grows with its length, so on a canvas whose
    samples end at EOS a lower entropy can be shorter samples rather than repetition (this number tells which)."""
    texts = list(texts)
    if not texts:
        raise ValueError("sample_length needs at least one text")
    return bootstrap([len(scorer.tokenizer.encode(t)) for t in texts], seed=seed)


def task_accuracy(examples: Sequence[TaskExample], predictions: Sequence[str]) -> Estimate:
    return proportion(score_all(examples, predictions))


def _features(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{what} features must be a non-empty (N, d) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} features contain NaN or infinite values")
    return array


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as mauve-text does before clustering."""
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    """faiss k-means on a few thousand points is fastest on one thread; with more it can be 40x slower
    when other jobs hold the cores (OpenMP threads spin waiting for each other)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


SMALL_SET_WARNING = re.compile(rb"WARNING clustering \d+ points to \d+ centroids: please provide at least \d+ "
                               rb"training points\n")


@contextmanager
def _without_small_set_warnings() -> Iterator[None]:
    """faiss prints from C, to the process's stderr, a warning for every k-means run on fewer than 39 points per
    cluster, which MAUVE's own bucket rule (a tenth of the smaller set) always is: 15 lines per MAUVE estimate,
    hundreds per `jointdlm eval` table, about a setting we keep on purpose. Those lines are dropped; anything
    else written to stderr meanwhile is passed on."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            rest = SMALL_SET_WARNING.sub(b"", caught.read())
            if rest:
                sys.stderr.write(rest.decode(errors="replace"))
                sys.stderr.flush()


def mauve(
    reference_features: Any,
    generated_features: Any,
    seeds: Sequence[int] = (0, 1, 2),
    num_buckets: int | str = "auto",
    threads: int = 1,
) -> Estimate:
    """MAUVE between reference (p) and generated (q) feature sets, repeated over k-means seeds.

    `num_buckets="auto"` is mauve-text's own rule, a tenth of the smaller set; the value is the mean
    over seeds and the interval their min and max. Accepts numpy arrays or torch tensors; never
    downloads a featurising model because the features are given.
    """
    try:
        import mauve as mauve_text
    except ImportError as err:
        raise ImportError("MAUVE needs the mauve-text package: pip install 'jointdlm[eval]'") from err
    if not seeds:
        raise ValueError("mauve needs at least one seed")
    p = _features(reference_features, "reference")
    q = _features(generated_features, "generated")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"feature widths differ: reference {p.shape[1]}, generated {q.shape[1]}")
    directions = _unit_rows(np.vstack([p, q]))
    if np.allclose(directions, directions[0]):
        return Estimate(1.0, 1.0, 1.0, min(len(p), len(q)), "mauve kmeans seeds (all features identical)")
    scores = []
    with _faiss_threads(threads), _without_small_set_warnings():
        for s in seeds:
            out = mauve_text.compute_mauve(
                p_features=p, q_features=q, num_buckets=num_buckets, device_id=-1, verbose=False, seed=int(s)
            )
            scores.append(float(out.mauve))
    return Estimate(float(np.mean(scores)), min(scores), max(scores), min(len(p), len(q)), "mauve kmeans seeds")


def mauve_texts(
    scorer: CausalScorer,
    reference_texts: Sequence[str],
    generated_texts: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
) -> Estimate:
    """MAUVE with features from the project's own causal LM, so it runs offline for built-in models."""
    return mauve(scorer.features(list(reference_texts)), scorer.features(list(generated_texts)), seeds)


@torch.no_grad()
def base_features(model: DiffusionLM, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """(N, d) features of finished texts from the diffusion base itself: its last hidden states on the fully
    unmasked text, averaged over the text's tokens. Used for MAUVE when no scorer is given, so an evaluation
    on a user's own model still measures distance to the K=1 reference."""
    spec = model.spec
    bos = [] if spec.bos_id is None else [spec.bos_id]
    rows = [(bos + model.tokenizer.encode(t) + [spec.eos_id])[: model.max_length] for t in texts]
    # A model whose padded rows differ from the same rows alone (code that ignores padding) reads texts of one
    # length at a time, as the sampling loop batches its prompts: a text's features must not depend on its batch.
    by_length = not getattr(model, "pads_exactly", True)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if by_length else list(range(len(rows)))
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == batch_size or (by_length and len(rows[i]) != len(rows[batches[-1][0]])):
            batches.append([])
        batches[-1].append(i)
    out: list[torch.Tensor | None] = [None] * len(rows)
    for batch in batches:
        chunk = [rows[i] for i in batch]
        width = max(len(r) for r in chunk)
        tokens = torch.full((len(chunk), width), spec.pad_id, dtype=torch.long)
        attention = torch.zeros_like(tokens)
        for i, r in enumerate(chunk):
            tokens[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
        hidden = model.forward(tokens.to(model.device), attention.to(model.device)).hidden.float().cpu()
        weights = attention[..., None].float()
        for i, feature in zip(batch, (hidden * weights).sum(1) / weights.sum(1), strict=True):
            out[i] = feature
    return torch.stack(out)


def mauve_base(model: DiffusionLM, reference_texts: Sequence[str], generated_texts: Sequence[str],
               seeds: Sequence[int] = (0, 1, 2)) -> Estimate:
    """MAUVE on the base model's own features (see `base_features`)."""
    return mauve(base_features(model, reference_texts), base_features(model, generated_texts), seeds)
