"""Invariants of the one sampling loop, checked on a tiny trained MDLM with recording and broken samplers."""

import math

import pytest
import torch

from jointdlm.sampling.base import NonFiniteLogitsError, StepContext, StepResult, TokenChoice, check_step
from jointdlm.sampling.loop import (
    MAX_FILL,
    Counters,
    SamplingConfig,
    build_canvas,
    encode_prompts,
    fill_length,
    generate,
    generate_parts,
)
from jointdlm.sampling.parallel import ParallelSampler
from jointdlm.sampling.registry import make_from_spec, make_sampler
from jointdlm.sampling.rules import RULES, Marginals
from jointdlm.sampling.sequential import SequentialSampler

PROMPTS = ["the cat", "the", "the busy bee buzzed"]
PROMPTS8 = ["the cat", "the", "the busy bee buzzed", "the wise owl", "", "the sleek cat sat", "the cat", "the strong"]


class Recorder:
    """Wraps a sampler and keeps a copy of every StepContext's canvas and every StepResult."""

    def __init__(self, inner):
        self.inner = inner
        self.name = f"recorded-{inner.name}"
        self.follows_budget = inner.follows_budget
        self.steps: list[dict[str, torch.Tensor]] = []

    def step(self, ctx: StepContext) -> StepResult:
        result = self.inner.step(ctx)
        self.steps.append({"tokens": ctx.tokens.clone(), "eligible": ctx.eligible.clone(),
                           "budget": ctx.budget.clone(), "fill": result.fill.clone(), "written": result.tokens.clone()})
        return result


def whole(**settings) -> SamplingConfig:
    """A config that samples every position: most invariants here are about whole canvases (the tiny model ends
    texts early, after which a sample stops by default: the last section)."""
    return SamplingConfig(stop_at_text_end=False, **settings)


def expected_nfe(length: int, k: int, block: int | None = None) -> int:
    block = block or length
    return sum(math.ceil(min(block, length - s) / k) for s in range(0, length, block))


# --------------------------------------------------------------------------------------------- canvas and prompt


def test_canvas_is_left_padded_bos_prompt_then_masks(tiny_model):
    spec = tiny_model.spec
    prefixes = encode_prompts(tiny_model, PROMPTS)
    assert all(p[0] == spec.bos_id and len(p) >= 1 for p in prefixes)
    assert len({len(p) for p in prefixes}) == 3, "the test needs prompts of different token lengths"
    tokens, attention, start = build_canvas(tiny_model, prefixes, 6)
    longest = max(len(p) for p in prefixes)
    assert start == longest and tokens.shape == (3, longest + 6)
    for row, prefix in enumerate(prefixes):
        pad = longest - len(prefix)
        assert tokens[row, :pad].tolist() == [spec.pad_id] * pad
        assert attention[row, :pad].tolist() == [0] * pad
        assert tokens[row, pad:start].tolist() == prefix
        assert attention[row, pad:].tolist() == [1] * (len(prefix) + 6)
        assert tokens[row, start:].tolist() == [spec.mask_id] * 6


@pytest.mark.parametrize("sampler_name,k", [("parallel", 3), ("sequential", 1)])
def test_prompt_untouched_and_every_position_filled_once(tiny_model, sampler_name, k):
    spec = tiny_model.spec
    length = 10
    rec = Recorder(make_sampler(sampler_name))
    config = whole(length=length, tokens_per_step=k, record_history=True)
    gen = generate(tiny_model, rec, config, prompts=PROMPTS)
    initial, _, start = build_canvas(tiny_model, encode_prompts(tiny_model, PROMPTS), length)

    assert len(rec.steps) == expected_nfe(length, k)
    fills = torch.zeros_like(initial)
    previous = initial
    for i, s in enumerate(rec.steps):
        canvas = s["tokens"]
        assert canvas.shape == initial.shape, "all rows share a schedule, so every row is active at every step"
        assert torch.equal(canvas[:, :start], initial[:, :start]), f"prefix (pads, BOS, prompt) changed at step {i}"
        assert torch.equal(canvas, previous), "the loop changed the canvas outside the sampler's fill"
        assert torch.equal(s["eligible"], canvas == spec.mask_id)
        assert not s["fill"][:, :start].any()
        fills += s["fill"].long()
        previous = torch.where(s["fill"], s["written"], canvas)
        filled_before = canvas != spec.mask_id
        assert torch.equal(previous[filled_before], canvas[filled_before]), "a filled position changed again"
    assert (fills[:, start:] == 1).all() and (fills[:, :start] == 0).all()
    assert not (previous == spec.mask_id).any()
    assert previous[:, start:].tolist() == gen.tokens
    # history: every position has a step, each step index appears, and the step agrees with the recording
    hist = torch.tensor(gen.history)
    assert hist.shape == (3, length) and (hist >= 0).all()
    assert set(hist.flatten().tolist()) == set(range(len(rec.steps)))
    for i, s in enumerate(rec.steps):
        assert torch.equal(hist == i, s["fill"][:, start:])


def test_generated_text_is_decoded_generated_region_only(tiny_model):
    gen = generate(tiny_model, make_sampler("parallel"), whole(length=8, tokens_per_step=2), prompts=PROMPTS)
    ends = {tiny_model.spec.eos_id, tiny_model.spec.pad_id}  # the text ends at the first EOS or PAD
    for text, toks in zip(gen.texts, gen.tokens, strict=True):
        assert len(toks) == 8
        cut = toks[: next((i for i, t in enumerate(toks) if t in ends), len(toks))]
        assert text == tiny_model.tokenizer.decode(cut)
    assert gen.prompts == PROMPTS


# ----------------------------------------------------------------------------------------------- NFE and schedule


@pytest.mark.parametrize("length,k", [(12, 1), (12, 3), (12, 5), (12, 12), (7, 20), (13, 4)])
def test_nfe_parallel_fixed_k(tiny_model, length, k):
    gen = generate(tiny_model, make_sampler("parallel"), whole(length=length, tokens_per_step=k), num=2)
    c = gen.counters
    assert c.base_passes == math.ceil(length / k) == c.steps
    assert c.extra_passes == 0
    assert c.generated_tokens == 2 * length and c.samples == 2
    assert c.tokens_per_base_pass == pytest.approx(length / math.ceil(length / k))


def test_nfe_sequential_is_length(tiny_model):
    gen = generate(tiny_model, make_sampler("sequential"), whole(length=11), num=3)
    assert gen.counters.base_passes == 11 and gen.counters.tokens_per_base_pass == pytest.approx(1.0)
    assert gen.counters.generated_tokens == 33


@pytest.mark.parametrize("length,block,k", [(12, 4, 3), (12, 5, 2), (10, 3, 4), (9, 9, 2), (8, 20, 3)])
def test_nfe_with_blocks(tiny_model, length, block, k):
    config = whole(length=length, tokens_per_step=k, block_length=block)
    gen = generate(tiny_model, make_sampler("parallel"), config, num=2)
    assert gen.counters.base_passes == expected_nfe(length, k, block)


@pytest.mark.parametrize("length,block,steps", [(12, None, 4), (12, None, 5), (13, None, 13), (12, 4, 6), (12, 6, 4)])
def test_nfe_with_steps(tiny_model, length, block, steps):
    config = whole(length=length, steps=steps, block_length=block, record_history=True)
    gen = generate(tiny_model, make_sampler("parallel"), config, num=2)
    assert gen.counters.base_passes == steps
    hist = torch.tensor(gen.history)
    assert set(hist.flatten().tolist()) == set(range(steps))


@pytest.mark.parametrize("block", [3, 4, 5])
def test_semi_autoregressive_blocks_fill_in_order(tiny_model, block):
    length = 12
    config = whole(length=length, tokens_per_step=2, block_length=block, record_history=True)
    gen = generate(tiny_model, make_sampler("parallel"), config, prompts=PROMPTS)
    for hist in gen.history:
        blocks = [hist[s:s + block] for s in range(0, length, block)]
        for earlier, later in zip(blocks, blocks[1:], strict=False):
            assert max(earlier) < min(later), f"block filled before the previous one finished: {hist}"


def test_rows_finishing_at_different_steps(tiny_model):
    """A sampler that ignores the budget (row r fills r+1 positions) makes rows drop out of the active set."""

    class Uneven:
        name = "uneven"
        follows_budget = False

        def __init__(self):
            self.active_rows: list[int] = []
            self.row_of: dict[int, int] = {}

        def step(self, ctx):
            self.active_rows.append(ctx.tokens.shape[0])
            for g in ctx.generators:  # the first step sees every row, in order
                self.row_of.setdefault(id(g), len(self.row_of))
            fill = torch.zeros_like(ctx.eligible)
            for row, g in enumerate(ctx.generators):
                pos = ctx.eligible[row].nonzero().squeeze(-1)[: self.row_of[id(g)] + 1]
                fill[row, pos] = True
            return StepResult(fill=fill, tokens=torch.full_like(ctx.tokens, 10), base_passes=1)

    sampler = Uneven()
    gen = generate(tiny_model, sampler, whole(length=6, record_history=True), num=3)
    assert all(t == [10] * 6 for t in gen.tokens)
    assert sampler.active_rows[0] == 3 and sampler.active_rows[-1] == 1
    assert [max(h) + 1 for h in gen.history] == [6, 3, 2]
    assert gen.counters.base_passes == pytest.approx((6 + 3 + 2) / 3)


# ------------------------------------------------------------------------------------------------------- rules


def test_left_to_right_fills_in_order(tiny_model):
    choice = TokenChoice(rule="left_to_right")
    for name in ("sequential", "parallel"):
        gen = generate(tiny_model, make_sampler(name), whole(length=9, choice=choice, record_history=True),
                       prompts=PROMPTS)
        assert gen.history == [list(range(9))] * 3


def test_left_to_right_parallel_k_fills_leftmost(tiny_model):
    choice = TokenChoice(rule="left_to_right")
    config = whole(length=9, tokens_per_step=4, choice=choice, record_history=True)
    gen = generate(tiny_model, make_sampler("parallel"), config, num=2)
    assert gen.history == [[0, 0, 0, 0, 1, 1, 1, 1, 2]] * 2


def test_random_rule_order_depends_on_seed(tiny_model):
    orders = []
    for seed in (0, 1, 2):
        config = whole(length=12, choice=TokenChoice(rule="random"), seed=seed, record_history=True)
        gen = generate(tiny_model, make_sampler("sequential"), config, num=2)
        for hist in gen.history:
            assert sorted(hist) == list(range(12))
        orders.append(gen.history)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders[0][0] != orders[0][1], "two samples of one run should get different random orders"
    assert orders[0][0] != list(range(12))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name,k", [("parallel", 3), ("sequential", 1)])
def test_every_rule_runs(tiny_model, rule, name, k):
    config = whole(length=8, tokens_per_step=k, choice=TokenChoice(rule=rule), record_history=True)
    gen = generate(tiny_model, make_sampler(name), config, prompts=PROMPTS)
    assert gen.counters.base_passes == math.ceil(8 / k)
    for toks, hist in zip(gen.tokens, gen.history, strict=True):
        assert tiny_model.spec.mask_id not in toks and -1 not in hist


def test_confidence_rule_fills_the_most_confident_position(tiny_model):
    """Sequential + confidence at step 0 must pick argmax over positions of max-prob (checked by recomputing)."""
    rec = Recorder(SequentialSampler())
    generate(tiny_model, rec, whole(length=8, choice=TokenChoice(rule="confidence")), prompts=PROMPTS)
    for s in rec.steps:
        ctx_tokens, fill = s["tokens"], s["fill"]
        _, attention, _ = build_canvas(tiny_model, encode_prompts(tiny_model, PROMPTS), 8)
        logits = tiny_model.forward(ctx_tokens, attention).logits.float()
        logits[..., tiny_model.spec.never_sampled()] = -torch.inf
        conf = logits.softmax(-1).max(-1).values.masked_fill(~s["eligible"], -1)
        assert torch.equal(fill.float().argmax(-1), conf.argmax(-1))


# ------------------------------------------------------------------------------------------------ token sampling


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (5.0, 0, 1.0), (50.0, 0, 1.0), (2.0, 0, 0.99)])
def test_mask_and_bos_never_generated(tiny_model, temperature, top_k, top_p):
    spec = tiny_model.spec
    choice = TokenChoice(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = generate(tiny_model, make_sampler("parallel"), whole(length=16, tokens_per_step=4, choice=choice),
                   num=24)
    flat = [t for toks in gen.tokens for t in toks]
    assert spec.mask_id not in flat and spec.bos_id not in flat
    if temperature >= 5:
        assert len(set(flat)) > 50, "a hot sampler should spread over many ids (else the test proves nothing)"


class GreedyChecker:
    """Parallel sampler that checks every written token is the argmax of the model's allowed distribution."""

    name = "greedy-check"
    follows_budget = True

    def __init__(self):
        self.inner = ParallelSampler()
        self.checked = 0

    def step(self, ctx):
        result = self.inner.step(ctx)
        lp = ctx.logprobs(ctx.forward().logits)
        assert torch.equal(result.tokens[result.fill], lp.at(result.fill).argmax(-1))
        self.checked += int(result.fill.sum())
        return result


def test_greedy_is_argmax_and_deterministic(tiny_model):
    greedy = TokenChoice(temperature=0.0)
    checker = GreedyChecker()
    a = generate(tiny_model, checker, whole(length=12, tokens_per_step=3, choice=greedy, seed=0), num=3)
    assert checker.checked == 3 * 12
    b = generate(tiny_model, make_sampler("parallel"),
                 whole(length=12, tokens_per_step=3, choice=greedy, seed=7), num=3)
    assert a.tokens == b.tokens, "greedy decoding must not depend on the seed"
    assert a.tokens[0] == a.tokens[1] == a.tokens[2], "greedy unconditional samples are all the same string"


def test_top_k_one_equals_greedy(tiny_model):
    greedy = generate(tiny_model, make_sampler("parallel"),
                      whole(length=12, tokens_per_step=2, choice=TokenChoice(temperature=0.0)),
                      prompts=PROMPTS)
    top1 = generate(tiny_model, make_sampler("parallel"),
                    whole(length=12, tokens_per_step=2, choice=TokenChoice(temperature=1.0, top_k=1), seed=5),
                    prompts=PROMPTS)
    sampled = generate(tiny_model, make_sampler("parallel"),
                       whole(length=12, tokens_per_step=2, choice=TokenChoice(temperature=1.0), seed=5),
                       prompts=PROMPTS)
    assert top1.tokens == greedy.tokens
    assert sampled.tokens != greedy.tokens


# ----------------------------------------------------------------------------------------- seeds and batching


def test_same_seed_same_output_different_seed_different(tiny_model):
    def run(seed):
        return generate(tiny_model, make_sampler("parallel"), whole(length=14, tokens_per_step=2, seed=seed),
                        num=4).tokens

    a, b, c = run(3), run(3), run(4)
    assert a == b
    assert sum(x != y for x, y in zip(a, c, strict=True)) >= 3
    assert len({tuple(t) for t in a}) == 4, "samples of one run must differ from each other"


@pytest.mark.parametrize("name,k", [("parallel", 3), ("sequential", 1)])
def test_batch_independence(tiny_model, name, k):
    def run(batch_size, prompts):
        config = whole(length=14, tokens_per_step=k, batch_size=batch_size, seed=11, record_history=True)
        return generate(tiny_model, make_sampler(name), config, prompts=prompts, num=None if prompts else 8)

    for prompts in (None, PROMPTS8):
        full, single = run(8, prompts), run(1, prompts)
        differ = sum(a != b for a, b in zip(full.tokens, single.tokens, strict=True))
        print(f"\nbatch independence {name} prompts={prompts is not None}: {differ}/8 samples differ")
        assert differ <= 1
        order_differ = sum(a != b for a, b in zip(full.history, single.history, strict=True))
        assert order_differ <= 1
        three = run(3, prompts)  # batches of 3, 3, 2: other paddings again
        assert sum(a != b for a, b in zip(full.tokens, three.tokens, strict=True)) <= 1


def test_index_offset_regenerates_a_slice(tiny_model):
    config = SamplingConfig(length=10, tokens_per_step=2, seed=2, batch_size=3)
    whole = generate(tiny_model, make_sampler("parallel"), config, num=8)
    tail = generate(tiny_model, make_sampler("parallel"), config, num=4, index_offset=4)
    head = generate(tiny_model, make_sampler("parallel"), config, num=4)
    assert tail.tokens == whole.tokens[4:]
    assert head.tokens == whole.tokens[:4]
    assert tail.tokens != head.tokens


@pytest.mark.parametrize("prompts", [None, PROMPTS8])
def test_generation_in_parts_gives_the_samples_and_counters_of_one_call(tiny_model, prompts):
    """`sample` streams its rows part by part (a large --num never sits in memory whole): the parts must be the
    samples of one call, and their counters must fold into that call's."""
    config = SamplingConfig(length=10, tokens_per_step=3, seed=5, batch_size=2)
    whole = generate(tiny_model, make_from_spec("threshold:tau=0.5"), config, prompts=prompts, num=8)
    parts = list(generate_parts(tiny_model, make_from_spec("threshold:tau=0.5"), config, prompts=prompts, num=8,
                                part_size=3))
    assert [offset for offset, _ in parts] == [0, 3, 6]
    assert [t for _, part in parts for t in part.tokens] == whole.tokens
    assert [t for _, part in parts for t in part.texts] == whole.texts
    folded = Counters()
    for _, part in parts:
        folded.add(part.counters)
    assert (folded.samples, folded.generated_tokens) == (whole.counters.samples, whole.counters.generated_tokens)
    for name in ("base_passes", "extra_passes", "steps"):  # per-sample means; the threshold's vary by row
        assert getattr(folded, name) == pytest.approx(getattr(whole.counters, name))
    assert len({part.counters.base_passes for _, part in parts}) > 1, "parts with equal means test nothing"
    with pytest.raises(ValueError, match="part_size"):
        next(generate_parts(tiny_model, make_sampler("parallel"), config, num=2, part_size=0))


# ------------------------------------------------------------------------------------------------- check_step


class Broken:
    follows_budget = True

    def __init__(self, kind: str):
        self.name = f"broken-{kind}"
        self.kind = kind
        self.inner = ParallelSampler()

    def step(self, ctx):
        good = self.inner.step(ctx)
        fill, tokens = good.fill.clone(), good.tokens.clone()
        if self.kind == "prompt":
            fill[:, 0] = True  # BOS / padding column: never eligible
        elif self.kind == "filled":
            if not (~ctx.eligible).any():
                return good
            fill = fill | (~ctx.eligible & (ctx.tokens != ctx.model.spec.pad_id))
        elif self.kind == "mask":
            tokens = torch.where(fill, ctx.model.spec.mask_id, tokens)
        elif self.kind == "bos":
            tokens = torch.where(fill, ctx.model.spec.bos_id, tokens)
        elif self.kind == "vocab":
            tokens = torch.where(fill, ctx.model.spec.vocab_size, tokens)
        elif self.kind == "nothing":
            fill = torch.zeros_like(fill)
        elif self.kind == "too_many":
            fill = ctx.eligible.clone()
        elif self.kind == "shape":
            fill = fill[:, 1:]
        return StepResult(fill=fill, tokens=tokens, base_passes=1)


@pytest.mark.parametrize("kind", ["prompt", "filled", "mask", "bos", "vocab", "nothing", "too_many", "shape"])
def test_check_step_catches_broken_sampler(tiny_model, kind):
    config = whole(length=8, tokens_per_step=2)
    with pytest.raises(AssertionError):
        generate(tiny_model, Broken(kind), config, prompts=PROMPTS)


def test_check_step_accepts_good_step_and_budget(tiny_model):
    tokens, attention, start = build_canvas(tiny_model, encode_prompts(tiny_model, PROMPTS), 4)
    eligible = tokens == tiny_model.spec.mask_id
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    ctx = StepContext(model=tiny_model, tokens=tokens, attention_mask=attention, eligible=eligible,
                      budget=torch.tensor([2, 2, 2]), generators=gens, choice=TokenChoice())
    fill = torch.zeros_like(eligible)
    fill[:, start:start + 2] = True
    ok = StepResult(fill=fill, tokens=torch.full_like(tokens, 20))
    check_step(ctx, ok, follows_budget=True)
    one = fill.clone()
    one[:, start + 1] = False
    check_step(ctx, StepResult(fill=one, tokens=ok.tokens), follows_budget=False)
    with pytest.raises(AssertionError, match="schedule asked"):
        check_step(ctx, StepResult(fill=one, tokens=ok.tokens), follows_budget=True)
    with pytest.raises(AssertionError, match="non-negative"):
        check_step(ctx, StepResult(fill=fill, tokens=ok.tokens, extra_passes=-1), follows_budget=True)


# ------------------------------------------------------------------------------------------------- validation


def test_sequential_rejects_more_than_one_token_per_step(tiny_model):
    with pytest.raises(ValueError, match="token per step"):
        generate(tiny_model, make_sampler("sequential"), whole(length=8, tokens_per_step=2), num=1)
    with pytest.raises(ValueError, match="token per step"):
        generate(tiny_model, make_sampler("sequential"), whole(length=12, steps=4), num=1)
    # steps == length is one token per step: allowed
    gen = generate(tiny_model, make_sampler("sequential"), whole(length=6, steps=6), num=1)
    assert gen.counters.base_passes == 6


def test_prompt_longer_than_canvas(tiny_model):
    long_prompt = " ".join(["the busy bee buzzed"] * 10)
    with pytest.raises(ValueError, match="exceeds"):
        generate(tiny_model, make_sampler("parallel"), whole(length=4), prompts=["the", long_prompt])
    with pytest.raises(ValueError, match="exceeds"):
        generate(tiny_model, make_sampler("parallel"), whole(length=tiny_model.max_length), num=1)
    ok = generate(tiny_model, make_sampler("parallel"), whole(length=tiny_model.max_length - 1), num=1)
    assert len(ok.tokens[0]) == tiny_model.max_length - 1


def test_generate_needs_prompts_or_num(tiny_model):
    with pytest.raises(ValueError):
        generate(tiny_model, make_sampler("parallel"), whole(length=4))
    with pytest.raises(ValueError):
        generate(tiny_model, make_sampler("parallel"), whole(length=4), num=0)


@pytest.mark.parametrize("kwargs", [
    {"length": 0}, {"tokens_per_step": 0}, {"batch_size": 0}, {"block_length": 0}, {"steps": 0},
    {"length": 12, "block_length": 5, "steps": 4}, {"length": 8, "steps": 9},
])
def test_sampling_config_rejects(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_sampling_config_accepts_and_schedules():
    assert whole(length=12, block_length=5, steps=6).block_sizes() == [5, 5, 2]
    cfg = whole(length=10, tokens_per_step=4)
    assert cfg.schedule(10) == [4, 4, 2] and cfg.num_blocks == 1
    assert whole(length=10, steps=4).schedule(10) == [3, 3, 2, 2]


@pytest.mark.parametrize("kwargs", [{"rule": "bogus"}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -1.0},
                                    {"top_k": -1}])
def test_token_choice_rejects(kwargs):
    with pytest.raises(ValueError):
        TokenChoice(**kwargs)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("nope")


# ------------------------------------------------------------------------------- log-probabilities where they are read


def _context(model, eligible_from: int = 0):
    tokens, attention, start = build_canvas(model, encode_prompts(model, PROMPTS), 6)
    eligible = tokens == model.spec.mask_id
    eligible[:, : start + eligible_from] = False
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return StepContext(model=model, tokens=tokens, attention_mask=attention, eligible=eligible,
                       budget=torch.full((len(PROMPTS),), 2), generators=gens, choice=TokenChoice())


@pytest.mark.parametrize("rule", RULES)
def test_scores_and_samples_from_eligible_positions_equal_the_full_canvas(tiny_model, rule):
    """A pass's logits at the eligible positions only give the same scores and tokens as the full (B, T, V) ones."""
    ctx = _context(tiny_model, eligible_from=2)
    ctx.choice = TokenChoice(rule=rule)
    compact = ctx.forward()
    full = tiny_model.forward(ctx.tokens, ctx.attention_mask)
    assert compact.logits.shape == (int(ctx.eligible.sum()), tiny_model.spec.vocab_size)
    torch.testing.assert_close(compact.logits, full.logits[ctx.eligible])
    lp_compact, lp_full = ctx.logprobs(compact.logits), ctx.logprobs(full.logits)
    scores = ctx.scores(lp_compact)
    assert torch.equal(scores, ctx.scores(lp_full))
    assert torch.isinf(scores[~ctx.eligible]).all() and torch.isfinite(scores[ctx.eligible]).all()
    fill = ctx.eligible.clone()
    assert torch.equal(ctx.sample(lp_compact, fill), ctx.sample(lp_full, fill))


def test_marginals_refuse_positions_they_do_not_hold(tiny_model):
    ctx = _context(tiny_model, eligible_from=2)
    lp = ctx.logprobs(ctx.forward().logits)
    outside = ctx.tokens == tiny_model.spec.mask_id  # includes the two masked columns left of `eligible`
    assert (outside & ~ctx.eligible).any()
    with pytest.raises(ValueError, match="not computed"):
        lp.at(outside)
    with pytest.raises(ValueError, match="positions"):
        Marginals(ctx.eligible, lp.values[:-1])


class ShiftedModel:
    """The tiny model with its logits shifted (or one entry replaced): finite but huge, or not finite."""

    def __init__(self, model, offset: float = 0.0, poison: float | None = None):
        self.model, self.offset, self.poison = model, offset, poison
        self.spec, self.tokenizer = model.spec, model.tokenizer
        self.hidden_size, self.max_length, self.device = model.hidden_size, model.max_length, model.device

    def forward(self, tokens, attention_mask=None, at=None):
        out = self.model.forward(tokens, attention_mask, at)
        logits = out.logits + self.offset
        if self.poison is not None:
            logits.view(-1)[7] = self.poison
        return type(out)(logits=logits, hidden=out.hidden)


def test_non_finite_logits_fail_and_huge_finite_ones_do_not(tiny_model):
    config = whole(length=6, tokens_per_step=2, seed=0)
    # Finite logits whose sum overflows float32: the cheap check fails, the exact one passes.
    huge = ShiftedModel(tiny_model, offset=3e35)
    assert not torch.isfinite(huge.forward(*build_canvas(tiny_model, [[tiny_model.spec.bos_id]] * 2, 6)[:2])
                              .logits.sum())
    assert len(generate(huge, make_sampler("parallel"), config, num=2).tokens) == 2
    for poison in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteLogitsError, match="NaN/Inf logits at step 0"):
            generate(ShiftedModel(tiny_model, poison=poison), make_sampler("parallel"), config, num=2)


def test_the_default_length_fills_a_canvas_but_not_a_checkpoints_whole_window():
    """A released checkpoint's window (LLaDA 4,096 positions, Dream 131,072) is no canvas to fill by default."""
    from types import SimpleNamespace

    def model(max_length: int) -> SimpleNamespace:
        return SimpleNamespace(spec=SimpleNamespace(bos_id=1), max_length=max_length,
                               tokenizer=SimpleNamespace(encode=lambda text: [5] * len(text.split())))

    assert fill_length(model(24), ["a b"]) == 21 and fill_length(model(24), None) == 23
    assert fill_length(model(4096), ["a b"]) == fill_length(model(131072), None) == MAX_FILL == 256
    with pytest.raises(ValueError, match="leave no room"):
        fill_length(model(3), ["a b"])


def test_text_ends_at_a_pad_written_before_the_eos(tiny_model):
    """A base learns PAD only after a document's EOS; one written earlier ends the text there. Decoding drops
    special tokens, so without the cut the words after the PAD were glued on (naive parallel writes such a PAD in
    most English samples at K=48)."""
    spec, tok = tiny_model.spec, tiny_model.tokenizer
    words = tok.encode("the busy bee buzzed noisily")
    init = torch.tensor([[words[0], words[1], spec.pad_id, words[2], spec.eos_id, spec.pad_id]])
    gen = generate(tiny_model, make_sampler("parallel"), whole(length=6, progress=False), num=1, init=init)
    assert gen.tokens[0] == init[0].tolist()  # the tokens as written; only the text is cut
    assert gen.texts[0] == tok.decode(words[:2]) != tok.decode(words[:3])


# ------------------------------------------------------------------------------------- stopping at the text's end


@pytest.mark.parametrize("spec,k,block,cache", [("parallel", 3, None, None), ("sequential", 1, None, None),
                                                ("sequential", 1, 4, None), ("parallel", 2, 4, "dual"),
                                                ("threshold:tau=0.5", 1, None, None), ("eb:gamma=1", 1, 4, "prefix"),
                                                ("adjust:threshold=0.5", 4, None, None), ("adjust", 3, 4, None)])
def test_a_sample_stops_once_its_text_is_decided(tiny_model, spec, k, block, cache):
    """Once a stop token is written with nothing masked before it, later passes could only fill positions the
    text never shows: the texts are a whole-canvas run's, from fewer passes; what was not sampled is PAD, history
    -1. One row a batch, so both runs compute each row's passes at the same shapes."""
    from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
    from jointdlm.sampling.loop import stop_ids

    head = AdjustHead(AdjustHeadConfig.for_base(tiny_model)).eval() if spec.startswith("adjust") else None

    def run(stop):
        config = SamplingConfig(length=12, tokens_per_step=k, block_length=block, kv_cache=cache, seed=3,
                                batch_size=1, record_history=True, stop_at_text_end=stop)
        return generate(tiny_model, make_from_spec(spec, head=head), config, num=12)

    whole, stopped = run(False), run(True)
    assert stopped.texts == whole.texts
    assert stopped.counters.base_passes < whole.counters.base_passes
    assert stopped.counters.extra_passes <= whole.counters.extra_passes
    stops, pad = stop_ids(tiny_model), tiny_model.spec.pad_id
    early = 0
    for w, s, hist in zip(whole.tokens, stopped.tokens, stopped.history, strict=True):
        end = next((i for i, t in enumerate(s) if t in stops), len(s))
        assert s[:end + 1] == w[:end + 1]
        for i in range(end + 1, len(s)):
            assert (hist[i] == -1 and s[i] == pad) or (hist[i] >= 0 and s[i] == w[i])
        early += -1 in hist
    assert early >= 3, "the tiny model should end several texts early"


def test_a_stopped_sample_is_the_same_at_batch_size_1_and_8(tiny_model):
    def run(batch_size):
        config = SamplingConfig(length=14, tokens_per_step=2, block_length=7, seed=4, batch_size=batch_size,
                                record_history=True)
        return generate(tiny_model, make_sampler("parallel"), config, prompts=PROMPTS8)

    one, eight = run(1), run(8)
    assert sum(a != b for a, b in zip(one.tokens, eight.tokens, strict=True)) <= 1  # as for whole canvases above
    assert one.counters.base_passes < expected_nfe(14, 2, 7) == 8  # some rows stopped early


def test_a_prefilled_text_that_is_decided_costs_no_pass(tiny_model):
    spec, tok = tiny_model.spec, tiny_model.tokenizer
    words = tok.encode("the busy bee")
    init = torch.tensor([words + [spec.eos_id, spec.mask_id, spec.mask_id],
                         words[:2] + [spec.mask_id, spec.eos_id, spec.mask_id, spec.mask_id]])
    config = SamplingConfig(length=6, record_history=True, choice=TokenChoice(rule="left_to_right"))
    gen = generate(tiny_model, make_sampler("sequential"), config, num=2, init=init)
    assert gen.texts[0] == tok.decode(words) and gen.tokens[0][4:] == [spec.pad_id] * 2
    assert gen.history[0] == [-1] * 6
    assert gen.counters.base_passes == 0.5  # the second row fills its one masked position before the EOS, then stops
    assert gen.tokens[1][3] == spec.eos_id and gen.history[1][2] == 0 and gen.history[1][4:] == [-1, -1]
