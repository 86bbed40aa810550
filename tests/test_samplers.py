"""The training-free samplers (threshold, EB, PUNT) and the causal-LM baselines (EDLM, APD).

Each sampler is checked against the property that defines it: its reduction to the sequential sampler, its
behaviour on test-double models whose dependence structure is known exactly, and, on a tiny MDLM trained on
the template language, the dependence PUNT is meant to catch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jointdlm.data import get_language, validity_rate, write_corpus
from jointdlm.data.toy import CHOICE_JOBS
from jointdlm.models.causal import CausalScorer
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.models.protocol import ModelOutput
from jointdlm.models.train import PretrainConfig, pretrain
from jointdlm.sampling.apd import APDConfig, APDSampler
from jointdlm.sampling.base import StepContext, TokenChoice
from jointdlm.sampling.eb import EBConfig, EBSampler
from jointdlm.sampling.eb import accepted_count as eb_count
from jointdlm.sampling.edlm import EDLMConfig, EDLMSampler
from jointdlm.sampling.loop import SamplingConfig, build_canvas, encode_prompts, generate
from jointdlm.sampling.punt import PUNTConfig, PUNTSampler
from jointdlm.sampling.registry import make_sampler
from jointdlm.sampling.rules import Marginals, sample_at
from jointdlm.sampling.threshold import ThresholdConfig, ThresholdSampler, draws_and_confidence
from jointdlm.sampling.threshold import accepted_count as threshold_count

PROMPTS = ["the cat", "the", "the busy bee buzzed", ""]


def fixture_dir(tmp_path_factory, name: str) -> Path:
    """JOINTDLM_FIXTURE_CACHE=DIR keeps trained fixtures between runs while iterating."""
    cache = os.environ.get("JOINTDLM_FIXTURE_CACHE")
    return Path(cache) / name if cache else tmp_path_factory.mktemp(name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[BuiltinModel, CausalScorer]:
    """A tiny MDLM and a tiny causal scorer sharing its tokenizer, 200 steps each: ~35 s on one core."""
    root = fixture_dir(tmp_path_factory, "samplers")
    common = {"preset": "tiny", "progress": False}
    if not (root / "ar" / "training_done.json").exists():
        write_corpus("template", root / "corpus.txt", num=3000, seed=0)
        pretrain(root / "corpus.txt", root / "mdlm",
                 PretrainConfig(max_steps=200, vocab_size=1024, eval_every=200, save_every=200, **common))
        pretrain(root / "corpus.txt", root / "ar",
                 PretrainConfig(objective="ar", max_steps=200, tokenizer_from=str(root / "mdlm"), eval_every=200,
                                save_every=200, **common))
    return BuiltinModel.load(root / "mdlm"), CausalScorer.load(root / "ar")


@pytest.fixture(scope="module")
def model(trained) -> BuiltinModel:
    return trained[0]


@pytest.fixture(scope="module")
def scorer(trained) -> CausalScorer:
    return trained[1]


def canvas_length(model, prompts: list[str] | None = None) -> int:
    """The longest generation that fits after BOS and the longest prompt."""
    return model.max_length - max(len(p) for p in encode_prompts(model, prompts or [""]))


def build(name: str, scorer: CausalScorer, **options):
    if name in ("edlm", "apd"):
        options["scorer"] = scorer
    return make_sampler(name, **options)


# ------------------------------------------------------------------------------------------------ test doubles


class FixedModel:
    """A `DiffusionLM` test double whose output at each position never depends on the other tokens."""

    def __init__(self, like: BuiltinModel, seed: int = 0) -> None:
        self.spec = like.spec
        self.tokenizer = like.tokenizer
        self.hidden_size = 8
        self.max_length = like.max_length
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(self.max_length, self.spec.vocab_size, generator=gen) * 3

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> ModelOutput:
        b, t = tokens.shape
        logits = self.table[:t].expand(b, t, -1).clone()
        return ModelOutput(logits=logits if at is None else logits[at], hidden=torch.zeros(b, t, self.hidden_size))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*tokens.shape, self.hidden_size)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*hidden.shape[:-1], self.spec.vocab_size)

    def fingerprint(self) -> str:
        return "fixed"


class PairModel(FixedModel):
    """Generated positions come in pairs (1, 2), (3, 4), ... that must hold the same token, A or B.

    With its partner masked a position is A or B with probability 1/2 each; with the partner visible it copies
    it. Filling both members of a pair from one pass mismatches them half of the time.
    """

    A, B = 10, 11

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> ModelOutput:
        b, t = tokens.shape
        positions = torch.arange(t)
        partner = torch.where(positions % 2 == 1, positions + 1, positions - 1).clamp(0, t - 1)
        seen = tokens[:, partner]
        visible = seen != self.spec.mask_id
        logits = torch.full((b, t, self.spec.vocab_size), -1e4)
        logits[..., self.A] = torch.where(visible & (seen != self.A), -1e4, 0.0)
        logits[..., self.B] = torch.where(visible & (seen != self.B), -1e4, 0.0)
        return ModelOutput(logits=logits if at is None else logits[at], hidden=torch.zeros(b, t, self.hidden_size))

    def pairs_agree(self, tokens: list[int]) -> bool:
        return all(tokens[i] == tokens[i + 1] for i in range(0, len(tokens) - 1, 2))


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("factory,bad", [
    (ThresholdConfig, {"tau": -0.1}), (ThresholdConfig, {"tau": math.nan}), (ThresholdConfig, {"factor": 0.0}),
    (ThresholdConfig, {"factor": -1.0}), (EBConfig, {"gamma": -1e-3}), (EBConfig, {"gamma": math.inf}),
    (PUNTConfig, {"epsilon": -0.01}), (PUNTConfig, {"epsilon": math.nan}), (EDLMConfig, {"proposals": 0}),
    (EDLMConfig, {"proposals": 2.5}), (APDConfig, {"mixture_weight": 1.5}), (APDConfig, {"mixture_weight": -0.1}),
    (APDConfig, {"max_draft": 0}), (APDConfig, {"max_draft": True}),
])
def test_configs_reject_bad_values(factory, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        factory(**bad)


def test_published_defaults():
    assert ThresholdConfig() == ThresholdConfig(tau=0.9, factor=None)
    assert EBConfig().gamma == 0.01
    assert PUNTConfig().epsilon == 0.1
    assert EDLMConfig().proposals == 4
    assert APDConfig() == APDConfig(mixture_weight=0.5, max_draft=16)


def test_registry_builds_each_sampler_with_its_options(scorer):
    assert make_sampler("threshold", tau=0.5).config.tau == 0.5
    assert make_sampler("threshold", config=ThresholdConfig(factor=2.0)).config.factor == 2.0
    assert make_sampler("eb", gamma=0.2).config.gamma == 0.2
    assert make_sampler("punt", epsilon=0.05).config.epsilon == 0.05
    assert make_sampler("edlm", scorer=scorer, proposals=2).config.proposals == 2
    apd = make_sampler("apd", scorer=scorer, mixture_weight=0.7, max_draft=4)
    assert (apd.config.mixture_weight, apd.config.max_draft, apd.scorer) == (0.7, 4, scorer)
    classes = {"threshold": ThresholdSampler, "eb": EBSampler, "punt": PUNTSampler, "edlm": EDLMSampler,
               "apd": APDSampler}
    for name, cls in classes.items():
        sampler = build(name, scorer)
        assert isinstance(sampler, cls) and sampler.name == name and sampler.follows_budget == (name == "edlm")
    with pytest.raises(ValueError, match="not both"):
        ThresholdSampler(ThresholdConfig(), tau=0.5)
    with pytest.raises(TypeError):
        PUNTSampler(eps=0.1)
    with pytest.raises(ValueError, match="tau"):
        make_sampler("threshold", tau=-1.0)


# ------------------------------------------------------------------------------------------------ counting rules


def test_threshold_counts_by_tau_and_by_factor():
    conf = torch.tensor([[0.99, 0.95, 0.9, 0.5, -math.inf], [0.4, 0.3, -math.inf, -math.inf, -math.inf]],
                        dtype=torch.float64)
    assert threshold_count(conf, ThresholdConfig(tau=0.9)).tolist() == [3, 0]
    assert threshold_count(conf, ThresholdConfig(tau=0.0)).tolist() == [4, 2]
    assert threshold_count(conf, ThresholdConfig(tau=2.0)).tolist() == [0, 0]
    # (n+1)(1-c_n): 0.02, 0.15, 0.4, 2.5 | 1.2, 2.1
    assert threshold_count(conf, ThresholdConfig(factor=1.0)).tolist() == [3, 0]
    assert threshold_count(conf, ThresholdConfig(factor=3.0)).tolist() == [4, 2]
    shuffled = conf[:, [3, 0, 4, 2, 1]]
    assert threshold_count(shuffled, ThresholdConfig(factor=1.0)).tolist() == [3, 0]
    # Below the floor no position can pass: a drawn token's probability is at most its position's top one.
    assert ThresholdConfig(tau=0.7).floor == 0.7 and ThresholdConfig(factor=1.0).floor == 0.5
    assert ThresholdConfig(factor=3.0).floor < 0
    with pytest.raises(ValueError, match="extra"):
        ThresholdConfig(extra=-1)
    with pytest.raises(ValueError, match="extra"):
        ThresholdConfig(extra=0.5)
    with pytest.raises(ValueError, match="extra"):
        ThresholdConfig(extra=True)


def test_threshold_accepts_a_sure_position_only_when_its_draw_is_as_likely():
    """As Fast-dLLM's released code: a position passes when the token drawn there has a probability of at least
    tau (so a sure position passes as often as its draw is that likely, and then with that token), and a position
    whose top probability is below tau is never drawn for the test."""
    probabilities = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.99, 0.01], [0.3, 0.7]], dtype=torch.float64)
    logprobs = Marginals(torch.ones(1, 4, dtype=torch.bool), probabilities.log().float())
    confidence = probabilities.max(-1).values[None]
    accepted, modes = torch.zeros(4), torch.zeros(4)
    steps = 4000
    for step in range(steps):
        ctx = SimpleNamespace(sample=lambda lp, fill, step=step: sample_at(lp, fill, [step], 1.0, 0, 1.0))
        drawn_confidence, drawn = draws_and_confidence(ctx, logprobs, confidence, 0.9)
        assert torch.isinf(drawn_confidence[0, [1, 3]]).all()  # below the floor: not drawn
        likely = drawn_confidence >= 0.9
        assert (drawn[likely] == 0).all()  # the sure positions' mode
        accepted += likely[0].float()
        modes += (drawn[0] == 0).float()
    assert accepted[1] == 0 and accepted[3] == 0 and torch.equal(accepted[[0, 2]], modes[[0, 2]])
    # Within about 4 standard deviations of 0.95 and 0.99 (binomial, 4,000 draws).
    assert abs(accepted[0] / steps - 0.95) < 0.014 and abs(accepted[2] / steps - 0.99) < 0.007


def test_eb_counts_entropy_prefix():
    entropy = torch.tensor([[0.001, 0.004, 0.006, 0.5, math.inf], [0.3, 0.2, math.inf, math.inf, math.inf]],
                           dtype=torch.float64)
    neg = -entropy
    # prefix sums before each element: 0, .001, .005, .011 | 0, .2
    assert eb_count(neg, 0.01).tolist() == [3, 1]
    assert eb_count(neg, 0.0).tolist() == [1, 1]
    assert eb_count(neg, 0.25).tolist() == [4, 2]


# ----------------------------------------------------------------------------------- reductions to sequential


@pytest.mark.parametrize("name,options,rule", [
    ("threshold", {"tau": 1.5}, "confidence"),
    ("eb", {"gamma": 0.0}, "entropy"),
])
@pytest.mark.parametrize("temperature,block", [(1.0, None), (0.7, 8)])
def test_one_token_limit_is_the_sequential_sampler(model, name, options, rule, temperature, block):
    choice = TokenChoice(rule=rule, temperature=temperature)
    length = canvas_length(model, PROMPTS)
    config = SamplingConfig(length=length, block_length=block, choice=choice, seed=3, record_history=True)
    ours = generate(model, make_sampler(name, **options), config, prompts=PROMPTS)
    reference = generate(model, make_sampler("sequential"), config, prompts=PROMPTS)
    assert ours.tokens == reference.tokens
    assert ours.history == reference.history
    assert ours.counters.base_passes == reference.counters.base_passes <= length


def test_threshold_zero_fills_everything_at_once_and_factor_lies_between(model):
    length = canvas_length(model)
    config = SamplingConfig(length=length, record_history=True, stop_at_text_end=False)  # passes of whole canvases
    everything = generate(model, make_sampler("threshold", tau=0.0), config, num=4)
    assert everything.counters.base_passes == 1 and everything.history == [[0] * length] * 4
    factor = generate(model, make_sampler("threshold", factor=1.0), config, num=4).counters.base_passes
    default = generate(model, make_sampler("threshold"), config, num=4).counters.base_passes
    assert 1 < factor < length and 1 < default < length
    blocks = generate(model, make_sampler("threshold", tau=0.0),
                      SamplingConfig(length=length, block_length=5, stop_at_text_end=False), num=2)
    assert blocks.counters.base_passes == math.ceil(length / 5)
    # tau above every confidence: one position per step, two with extra=1 (the canvas in half the passes).
    one = generate(model, make_sampler("threshold", tau=2.0), config, num=4)
    two = generate(model, make_sampler("threshold", tau=2.0, extra=1), config, num=4)
    assert one.counters.base_passes == length and two.counters.base_passes == math.ceil(length / 2)
    assert all(torch.bincount(torch.tensor(h)).tolist()[:length // 2] == [2] * (length // 2) for h in two.history)


def test_eb_larger_gamma_fewer_steps(model):
    config = SamplingConfig(length=canvas_length(model))
    steps = [generate(model, make_sampler("eb", gamma=g), config, num=8).counters.base_passes
             for g in (0.0, 0.5, 5.0, 1e6)]
    assert steps[0] == canvas_length(model) and steps[-1] == 1
    assert steps == sorted(steps, reverse=True) and steps[1] > steps[2]


# ------------------------------------------------------------------------------------------------ PUNT


@pytest.mark.parametrize("length", [5, 8, 23])
def test_punt_fills_independent_positions_in_one_step(model, length):
    fixed = FixedModel(model)
    gen = generate(fixed, make_sampler("punt", epsilon=0.0), SamplingConfig(length=length, record_history=True), num=3)
    assert gen.counters.steps == 1 and gen.counters.extra_passes == 0
    assert gen.counters.base_passes == 1 + math.ceil(math.log2(length)), "test passes are base passes"
    assert gen.history == [[0] * length] * 3


def test_punt_separates_dependent_pairs_that_naive_parallel_breaks(model):
    pairs = PairModel(model)
    length = 16
    punt = generate(pairs, make_sampler("punt", epsilon=0.1), SamplingConfig(length=length, record_history=True),
                    num=20)
    assert all(pairs.pairs_agree(t) for t in punt.tokens)
    assert punt.counters.steps == 2, "one member of every pair, then the other members"
    assert punt.counters.base_passes > 2 and punt.counters.extra_passes == 0, "test passes are base passes"
    for hist in punt.history:
        assert all(hist[i] != hist[i + 1] for i in range(0, length, 2))
    naive = generate(pairs, make_sampler("parallel"), SamplingConfig(length=length, tokens_per_step=length // 2),
                     num=20)
    broken = sum(not pairs.pairs_agree(t) for t in naive.tokens)
    assert broken >= 10, f"naive parallel at the same tokens per pass should break pairs, broke {broken}/20"


def word_steps(model: BuiltinModel, tokens: list[int], history: list[int]) -> dict[int, set[int]]:
    """The steps at which the tokens of each word (by index in the decoded text) were filled."""
    steps: dict[int, set[int]] = {}
    for i, step in enumerate(history):
        word = len(model.tokenizer.decode(tokens[: i + 1]).split()) - 1
        steps.setdefault(word, set()).add(step)
    return steps


def dependence_stats(model: BuiltinModel, gen, language: str, first: int, second: int,
                     fixes: dict[str, str]) -> dict[str, float]:
    """Word `first` of a sentence fixes word `second` (`fixes`): how often the two were filled in one step, how
    often they agree, and how often they were filled in one step and disagree (`clash`), over the samples where
    word `first` is a known key."""
    together = agree = clash = n = 0
    for tokens, history, text in zip(gen.tokens, gen.history, gen.texts, strict=True):
        words = text.split()
        if len(words) <= second or words[first] not in fixes:
            continue
        n += 1
        agrees = fixes[words[first]] == words[second]
        steps = word_steps(model, tokens, history)
        one_step = bool(steps.get(first, set()) & steps.get(second, set()))
        agree += agrees
        together += one_step
        clash += one_step and not agrees
    return {"n": n, "together": together / max(n, 1), "agree": agree / max(n, 1), "clash": clash / max(n, 1),
            "validity": validity_rate(get_language(language), gen.texts)}


def subject_home_stats(model: BuiltinModel, gen) -> dict[str, float]:
    """Template sentences: word 2 is the subject, word 7 its home."""
    homes = {s.word: s.home for s in get_language("template").subjects}
    return dependence_stats(model, gen, "template", 2, 7, homes)


def test_punt_keeps_subject_and_home_apart_more_than_naive(model):
    """At matched tokens per step, PUNT fills the subject and the home it determines in one step far less
    often than naive parallel does, and so they agree more often. This tiny base knows the dependence only
    weakly (no sample is fully valid), so it shows up as a rate, not as validity; the slow test below measures
    validity on a base that knows the language. Seen over seeds 0-3 (300 samples): together 0.20-0.26 vs
    0.98-0.99, agree 0.21-0.28 vs 0.10-0.13."""
    length = canvas_length(model)
    punt = generate(model, make_sampler("punt", epsilon=0.02), SamplingConfig(length=length, record_history=True),
                    num=300)
    k = max(2, round(length / punt.counters.steps))
    naive = generate(model, make_sampler("parallel"),
                     SamplingConfig(length=length, tokens_per_step=k, record_history=True), num=300)
    ours, theirs = subject_home_stats(model, punt), subject_home_stats(model, naive)
    print(f"\nPUNT eps=0.02: {length / punt.counters.steps:.2f} tokens/step, "
          f"{punt.counters.tokens_per_base_pass:.2f} tokens/base pass (tests included), {ours}\nnaive K={k}: {theirs}")
    assert ours["n"] >= 150 and theirs["n"] >= 150
    assert ours["together"] <= theirs["together"] - 0.5
    assert ours["agree"] >= theirs["agree"] + 0.04


# ------------------------------------------------------------------------------------------------ EDLM


@pytest.mark.parametrize("rule,temperature,k", [("confidence", 1.0, 3), ("entropy", 0.8, 4), ("random", 1.0, 5)])
def test_edlm_with_one_proposal_is_naive_parallel(model, scorer, rule, temperature, k):
    config = SamplingConfig(length=canvas_length(model, PROMPTS), tokens_per_step=k, record_history=True, seed=5,
                            choice=TokenChoice(rule=rule, temperature=temperature))
    edlm = generate(model, make_sampler("edlm", scorer=scorer, proposals=1), config, prompts=PROMPTS)
    naive = generate(model, make_sampler("parallel"), config, prompts=PROMPTS)
    assert edlm.tokens == naive.tokens and edlm.history == naive.history
    assert edlm.counters.extra_passes == 0


def test_edlm_proposals_lower_the_scorer_nll(model, scorer):
    config = SamplingConfig(length=canvas_length(model), tokens_per_step=4, seed=1, stop_at_text_end=False)
    edlm = generate(model, make_sampler("edlm", scorer=scorer, proposals=4), config, num=32)
    naive = generate(model, make_sampler("parallel"), config, num=32)
    steps = math.ceil(canvas_length(model) / 4)
    assert edlm.counters.base_passes == steps and edlm.counters.extra_passes == 4 * steps
    ours, theirs = (sum(scorer.nll(g.texts)) / len(g.texts) for g in (edlm, naive))
    print(f"\nscorer NLL: edlm(4) {ours:.3f}, naive {theirs:.3f}")
    assert ours < theirs - 0.2


# ------------------------------------------------------------------------------------------------ APD


@pytest.mark.parametrize("max_draft", [1, 5, 8, 16, 40])
def test_apd_with_weight_one_accepts_every_draft(model, scorer, max_draft):
    length = canvas_length(model)
    config = SamplingConfig(length=length, record_history=True, stop_at_text_end=False)
    gen = generate(model, make_sampler("apd", scorer=scorer, mixture_weight=1.0, max_draft=max_draft), config, num=3)
    steps = math.ceil(length / max_draft)
    assert gen.counters.base_passes == steps == gen.counters.extra_passes
    assert gen.history == [[i // max_draft for i in range(length)]] * 3


def test_apd_with_weight_zero_greedy_is_causal_greedy_decoding(model, scorer):
    """R = 0 makes the target the causal model alone; greedily, every accepted token is its argmax."""
    length = 12
    config = SamplingConfig(length=length, choice=TokenChoice(temperature=0.0))
    gen = generate(model, make_sampler("apd", scorer=scorer, mixture_weight=0.0, max_draft=6), config,
                   prompts=PROMPTS[:2])
    tokens, attention, start = build_canvas(model, encode_prompts(model, PROMPTS[:2]), length)
    banned = model.spec.never_sampled()
    for i in range(length):
        lp = scorer.next_token_logprobs(tokens, attention)[:, start + i - 1]
        lp[:, banned] = -torch.inf
        tokens[:, start + i] = lp.argmax(-1)
    assert gen.tokens == tokens[:, start:].tolist()
    assert gen.counters.base_passes < length, "greedy drafts should agree with the causal model some of the time"


def test_apd_fills_left_to_right(model, scorer):
    config = SamplingConfig(length=canvas_length(model, PROMPTS), block_length=7, record_history=True)
    gen = generate(model, make_sampler("apd", scorer=scorer), config, prompts=PROMPTS)
    for hist in gen.history:  # -1: after the text's end, not sampled
        filled = [h for h in hist if h >= 0]
        assert filled == sorted(filled) and hist == filled + [-1] * (len(hist) - len(filled))
    assert gen.counters.extra_passes == gen.counters.base_passes


def test_apd_refuses_a_mask_left_of_the_draft(model, scorer):
    tokens, attention, start = build_canvas(model, encode_prompts(model, ["the"]), 6)
    eligible = tokens == model.spec.mask_id
    eligible[:, start] = False
    ctx = StepContext(model=model, tokens=tokens, attention_mask=attention, eligible=eligible,
                      budget=torch.tensor([5]), generators=[torch.Generator().manual_seed(0)], choice=TokenChoice())
    with pytest.raises(ValueError, match="left to right"):
        APDSampler(scorer=scorer).step(ctx)


# ------------------------------------------------------------------------------------------------ all samplers

ALL = [("threshold", {}), ("threshold", {"factor": 1.0}), ("eb", {}), ("eb", {"gamma": 1.0}),
       ("punt", {}), ("edlm", {"proposals": 3}), ("apd", {}), ("apd", {"max_draft": 4, "mixture_weight": 0.8})]


@pytest.mark.parametrize("name,options", ALL)
@pytest.mark.parametrize("rule,temperature,top_p,block", [("confidence", 1.0, 1.0, None), ("margin", 0.0, 1.0, 6),
                                                          ("random", 2.0, 0.9, None)])
def test_every_sampler_passes_the_step_invariants(model, scorer, name, options, rule, temperature, top_p, block):
    choice = TokenChoice(rule=rule, temperature=temperature, top_p=top_p)
    config = SamplingConfig(length=14, tokens_per_step=3, block_length=block, choice=choice, validate=True,
                            record_history=True, stop_at_text_end=False)
    gen = generate(model, build(name, scorer, **options), config, prompts=PROMPTS)
    banned = set(model.spec.never_sampled())
    for tokens, hist in zip(gen.tokens, gen.history, strict=True):
        assert not banned & set(tokens) and -1 not in hist
    assert gen.counters.steps <= 14, "every step fills at least one position"


@pytest.mark.parametrize("name,options", ALL)
def test_every_sampler_is_batch_independent(model, scorer, name, options):
    def run(batch_size, prompts):
        config = SamplingConfig(length=canvas_length(model, PROMPTS), batch_size=batch_size, seed=9, tokens_per_step=3,
                                record_history=True)
        return generate(model, build(name, scorer, **options), config, prompts=prompts, num=None if prompts else 4)

    for prompts in (None, PROMPTS):
        together, alone = run(4, prompts), run(1, prompts)
        assert together.tokens == alone.tokens
        assert together.history == alone.history
        # What a sample cost does not depend on its batch-mates either (PUNT charged every row the batch's tests).
        assert together.counters.base_passes == pytest.approx(alone.counters.base_passes)
        assert together.counters.extra_passes == pytest.approx(alone.counters.extra_passes)


# ------------------------------------------------------------------------------------------- validity (slow)


def job_place_stats(model: BuiltinModel, gen) -> dict[str, float]:
    """Choice sentences: word 2 is the job, word 12 its place."""
    return dependence_stats(model, gen, "choice", 2, 12, {job[0]: job[-1] for job in CHOICE_JOBS})


@pytest.mark.slow
def test_punt_keeps_validity_where_naive_parallel_loses_it(choice_model):
    """On a base that has learned the language, PUNT at ~8 tokens per step stays as valid as K=1 while
    naive parallel at the same tokens per step produces almost no valid sentence. (Counting PUNT's test passes,
    it makes ~2 tokens per base pass: docs/results.md §5.)"""
    model, length, num = choice_model, canvas_length(choice_model), 500
    config = SamplingConfig(length=length, record_history=True, batch_size=500, seed=1)
    sequential = validity_rate(get_language("choice"), generate(model, make_sampler("sequential"), config,
                                                               num=num).texts)
    punt = generate(model, make_sampler("punt", epsilon=0.1), config, num=num)
    k = max(2, round(length / punt.counters.steps))
    naive = generate(model, make_sampler("parallel"),
                     SamplingConfig(length=length, tokens_per_step=k, record_history=True, batch_size=500, seed=1),
                     num=num)
    ours, theirs = job_place_stats(model, punt), job_place_stats(model, naive)
    print(f"\nK=1 validity {sequential:.3f}; PUNT eps=0.1: {length / punt.counters.steps:.2f} tokens/step, "
          f"{punt.counters.tokens_per_base_pass:.2f} tokens/base pass (tests included), {ours}\nnaive K={k}: {theirs}")
    assert ours["validity"] >= sequential - 0.05
    assert ours["validity"] >= theirs["validity"] + 0.5
    # PUNT may write the job and its place in one step once the words already written fix both (a base can
    # commit to the tool first); what it must not do is write a clashing pair together, as naive parallel does.
    assert ours["clash"] <= 0.02 and theirs["clash"] >= 0.5


def test_gumbel_noise_in_place_is_the_uniforms_transform_in_any_chunking(monkeypatch):
    """The sampler's Gumbel noise, computed in place chunk by chunk, is -log(-log(u)) of the counter-based
    uniforms, whatever the chunk size; a row depends only on its (step seed, position, stream), not on the rows
    computed beside it; the uniforms lie in (0, 1) with mean and spread of a uniform."""
    from jointdlm.sampling import rules

    gen = torch.Generator().manual_seed(0)
    seeds = torch.randint(-2**62, 2**62, (300,), generator=gen)
    positions = torch.randint(0, 64, (300,), generator=gen)
    uniform = rules.uniform_grid(seeds, positions, 97, stream=2)
    assert 0 < uniform.min() and uniform.max() < 1
    assert abs(uniform.mean() - 0.5) < 0.005 and abs(uniform.var() - 1 / 12) < 0.002
    reference = -torch.log(-torch.log(uniform))
    assert torch.equal(rules.gumbel_grid(seeds, positions, 97, stream=2), reference)
    monkeypatch.setattr(rules, "NOISE_CHUNK", 500)  # 5 rows per chunk, the last chunk shorter
    assert torch.equal(rules.gumbel_grid(seeds, positions, 97, stream=2), reference)
    assert torch.equal(rules.gumbel_grid(seeds[7:8], positions[7:8], 97, stream=2), reference[7:8])
    assert not torch.equal(rules.gumbel_grid(seeds, positions, 97, stream=3), reference)


def test_top_probability_is_the_confidence_score_without_log_probabilities():
    """The head's passes score candidates with `top_probability` on logits (banned ids at -inf) instead of the
    confidence of full log-probabilities: the same numbers up to float32 rounding, and the same best candidate,
    at large and small logits alike."""
    from jointdlm.sampling import rules

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, 300, generator=gen) * torch.tensor([0.1, 1.0, 5.0, 30.0]).repeat(16)[:, None, None]
    logits = rules.without_banned(logits + 1000 * torch.randn(64, 1, 1, generator=gen), [0, 7])
    expected = rules.marginal_scores(torch.log_softmax(logits, dim=-1), "confidence")
    got = rules.top_probability(logits)
    assert got.shape == (64, 8) and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got < 0.01).any() and (got > 0.99).any()  # the spread of logits reaches both ends
    assert rules.top_probability(logits[:, :0]).shape == (64, 0)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_draws_are_the_same_in_any_chunking(monkeypatch, temperature, top_k, top_p):
    """`draw` works a chunk of rows at a time (to stay in the caches): the tokens do not depend on the chunk
    size, and a row's token not on the rows drawn beside it."""
    from jointdlm.sampling import rules

    gen = torch.Generator().manual_seed(1)
    lp = torch.log_softmax(torch.randn(50, 97, generator=gen) * 3, dim=-1)
    seeds = torch.randint(-2**62, 2**62, (50,), generator=gen)
    positions = torch.randint(0, 64, (50,), generator=gen)
    whole = rules.draw(lp, seeds, positions, temperature, top_k, top_p)
    assert len(set(whole.tolist())) > 10  # real draws, not one token everywhere
    monkeypatch.setattr(rules, "NOISE_CHUNK", 300)  # 3 rows per chunk, the last chunk shorter
    assert torch.equal(rules.draw(lp, seeds, positions, temperature, top_k, top_p), whole)
    assert torch.equal(rules.draw(lp[7:9], seeds[7:9], positions[7:9], temperature, top_k, top_p), whole[7:9])
    assert rules.draw(lp[:0], seeds[:0], positions[:0], temperature, top_k, top_p).shape == (0,)


def test_model_logprobs_in_place_are_log_softmax_in_any_chunking(monkeypatch):
    """On a CPU the log-probabilities are computed in place a chunk of rows at a time: the same values as one
    log_softmax of the whole, banned ids at -inf, and without `overwrite` the caller's logits stay as they were."""
    from jointdlm.sampling import rules

    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(41, 97, generator=gen) * 4
    expected = torch.log_softmax(logits.clone().index_fill_(-1, torch.tensor([0, 5]), -torch.inf), dim=-1)
    kept = logits.clone()
    assert torch.equal(rules.model_logprobs(logits, [0, 5]), expected) and torch.equal(logits, kept)
    monkeypatch.setattr(rules, "NOISE_CHUNK", 500)  # 5 rows per chunk, the last chunk shorter
    assert torch.equal(rules.model_logprobs(logits, [0, 5]), expected) and torch.equal(logits, kept)
    assert torch.equal(rules.model_logprobs(logits.clone(), [0, 5], overwrite=True), expected)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 3, 0.6)])
def test_draws_follow_the_tempered_truncated_distribution(temperature, top_k, top_p):
    """`draw` inverts the cumulative distribution at one uniform per (seed, position): over 40,000 keys its tokens
    follow softmax(truncate(...)) (total variation well under a wrong target's) and never a token it cuts."""
    from jointdlm.sampling import rules

    gen = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(1, 20, generator=gen) * 2, dim=-1)
    lp[0, 4] = -torch.inf  # a banned id
    n = 40_000
    seeds = torch.randint(-2**62, 2**62, (n,), generator=gen)
    positions = torch.randint(0, 64, (n,), generator=gen)
    tokens = rules.draw(lp.expand(n, -1), seeds, positions, temperature, top_k, top_p)
    freq = torch.bincount(tokens, minlength=20).double() / n
    target = torch.softmax(rules.truncate(lp, temperature, top_k, top_p), dim=-1)[0]
    wrong = torch.softmax(lp.double(), dim=-1)[0] if (temperature, top_k, top_p) != (1.0, 0, 1.0) else \
        torch.softmax(lp.double() / 1.5, dim=-1)[0]
    assert 0.5 * (freq - target).abs().sum() < 0.015
    assert 0.5 * (freq - wrong).abs().sum() > 0.05
    assert freq[target == 0].sum() == 0 and freq[4] == 0
