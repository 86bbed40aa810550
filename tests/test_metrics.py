import os
import random

import numpy as np
import pytest
import torch

from jointdlm.data import TemplateLanguage, make_examples
from jointdlm.eval import metrics
from jointdlm.eval.metrics import (
    Estimate,
    bootstrap,
    mauve,
    mauve_texts,
    nll,
    proportion,
    task_accuracy,
    token_entropy,
    total_variation,
    validity,
)
from jointdlm.models.causal import CausalScorer
from jointdlm.models.train import PretrainConfig, pretrain

SENTENCE = "the quick brown fox jumps over the lazy dog near the river bank"


@pytest.fixture(scope="module")
def memorised_scorer(tmp_path_factory) -> CausalScorer:
    root = tmp_path_factory.mktemp("memorised")
    corpus = root / "corpus.txt"
    corpus.write_text((SENTENCE + "\n") * 500, encoding="utf-8")
    pretrain(
        corpus,
        root / "model",
        PretrainConfig(
            preset="tiny", objective="ar", max_steps=150, vocab_size=400, progress=False, eval_every=150, save_every=150
        ),
    )
    return CausalScorer.load(root / "model")


def test_estimate_str():
    assert str(Estimate(0.8123, 0.781, 0.8449, 100, "x")) == "0.812 [0.78, 0.84]"


def test_wilson_on_known_counts():
    half = proportion([True] * 50 + [False] * 50)
    assert half.value == 0.5 and half.n == 100 and half.method == "wilson"
    assert half.low < 0.5 < half.high
    assert half.high - half.low == pytest.approx(0.192, abs=0.002)
    assert half.low == pytest.approx(0.4038, abs=1e-3)
    none, every = proportion([False] * 20), proportion([True] * 20)
    assert none.value == 0 and none.low == 0 and 0.1 < none.high < 0.2
    assert every.value == 1 and every.high == 1 and 0.8 < every.low < 0.9
    with pytest.raises(ValueError):
        proportion([])


def test_bootstrap_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(3.0, 1.0, 50), rng.normal(3.0, 1.0, 2000)
    a, b = bootstrap(small), bootstrap(large)
    assert a.low < a.value < a.high and a.value == pytest.approx(small.mean())
    assert b.low < b.value < b.high and b.low < 3.0 < b.high
    assert (b.high - b.low) < 0.3 * (a.high - a.low)
    assert (b.high - b.low) == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)
    assert bootstrap(small, seed=1) == bootstrap(small, seed=1)
    median = bootstrap(small, statistic=np.median, n_boot=300)
    assert median.value == pytest.approx(np.median(small)) and median.low <= median.value <= median.high
    assert bootstrap([2.0]) == Estimate(2.0, 2.0, 2.0, 1, "percentile bootstrap (1000)")


def test_validity_and_tv_on_template_language():
    lang = TemplateLanguage()
    support = list(lang.strings())
    full_valid, full_tv = validity(lang, support), total_variation(lang, support)
    assert full_valid.value == 1.0 and full_valid.low > 0.99
    assert full_tv.value == pytest.approx(0.0, abs=1e-9) and full_tv.high < 0.05

    invalid = [s.replace("cat", "dog", 1) for s in support if " cat " in s][:100]
    assert validity(lang, invalid).value == 0.0
    assert total_variation(lang, invalid).value == pytest.approx(1.0)
    assert total_variation(lang, invalid).low == pytest.approx(1.0)

    samples = lang.sample(1000, seed=0)
    sampled_tv = total_variation(lang, samples, seed=1)
    assert sampled_tv.low <= sampled_tv.value <= sampled_tv.high
    mixed = samples[:500] + invalid * 5
    assert validity(lang, mixed).low < 0.5 < validity(lang, mixed).high
    assert total_variation(lang, mixed).low > sampled_tv.high


def test_task_accuracy_is_a_proportion():
    examples = make_examples("all", 40, seed=0)
    predictions = [e.answer if i < 30 else "" for i, e in enumerate(examples)]
    estimate = task_accuracy(examples, predictions)
    assert estimate.value == 0.75 and estimate.n == 40 and estimate.low < 0.75 < estimate.high


def gaussians(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def test_mauve_of_a_set_against_itself_is_one():
    features = gaussians(200, 32, seed=0)
    same = mauve(features, features)
    assert same.value > 0.99 and same.method == "mauve kmeans seeds" and same.n == 200
    assert same.low <= same.value <= same.high


def test_mauve_of_two_draws_of_one_distribution_is_high():
    assert mauve(gaussians(200, 32, seed=0), torch.from_numpy(gaussians(200, 32, seed=1))).value > 0.9


def test_mauve_of_disjoint_sets_is_near_zero():
    reference = gaussians(200, 32, seed=0)
    far = mauve(reference, gaussians(200, 32, seed=1) + 10.0)
    assert far.high < 0.1


def test_mauve_keeps_stderr_free_of_faiss_small_set_warnings(capfd):
    """200 + 200 points in MAUVE's 20 buckets: faiss warns from C for each of its 5 k-means runs per seed."""
    mauve(gaussians(200, 32, seed=0), gaussians(200, 32, seed=1), seeds=(0,))
    assert "WARNING clustering" not in capfd.readouterr().err
    with metrics._without_small_set_warnings():
        os.write(2, b"WARNING clustering 400 points to 20 centroids: please provide at least 780 training points\n"
                    b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"


def test_mauve_checks_shapes():
    with pytest.raises(ValueError, match="widths differ"):
        mauve(gaussians(50, 8, 0), gaussians(50, 9, 1))


def test_nll_of_memorised_sentence(memorised_scorer):
    words = SENTENCE.split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words)
    memorised = nll(memorised_scorer, [SENTENCE])
    scrambled = nll(memorised_scorer, [shuffled])
    assert memorised.value < 0.5
    assert scrambled.value > memorised.value + 2.0
    both = nll(memorised_scorer, [SENTENCE, shuffled] * 10)
    assert both.low < both.value < both.high and both.n == 20


def test_mauve_of_identical_points_is_one():
    point = np.tile(gaussians(1, 16, seed=0), (30, 1))
    assert mauve(point, 2 * point).value == 1.0


def test_mauve_texts_runs_offline(memorised_scorer):
    texts = TemplateLanguage().sample(60, seed=0)
    assert mauve_texts(memorised_scorer, texts, texts, seeds=(0,)).value > 0.99


def test_token_entropy_is_each_samples_own_frequencies():
    # Four distinct tokens once each: log 4; one token repeated: 0; two tokens 3:1; an empty sample: 0.
    est = token_entropy([[5, 6, 7, 8], [9, 9, 9, 9], [1, 1, 1, 2], []])
    each = [np.log(4), 0.0, -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)), 0.0]
    assert est.value == pytest.approx(np.mean(each)) and est.n == 4
    assert est.low <= est.value <= est.high


def test_entropy_tells_repetition_from_text(memorised_scorer):
    # The scorer's NLL prefers the repeated word to the shuffled sentence: entropy is what tells them apart.
    words = SENTENCE.split()
    shuffled = [" ".join(random.Random(s).sample(words, len(words))) for s in range(20)]
    repeated = ["the " * 12] * 20
    assert metrics.entropy(memorised_scorer, repeated).high < metrics.entropy(memorised_scorer, shuffled).low
    assert metrics.entropy(memorised_scorer, [SENTENCE]).value == pytest.approx(
        token_entropy([memorised_scorer.tokenizer.encode(SENTENCE)]).value)
    with pytest.raises(ValueError, match="at least one text"):
        metrics.entropy(memorised_scorer, [])
    lengths = metrics.sample_length(memorised_scorer, [SENTENCE, "the"])
    assert lengths.value == pytest.approx((len(memorised_scorer.tokenizer.encode(SENTENCE)) + 1) / 2)
