"""The evaluation grid end to end on tiny models: files written, metrics present, reference cached."""

from __future__ import annotations

import json

import pytest

from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
from jointdlm.cli import main
from jointdlm.data import write_corpus
from jointdlm.eval.runner import EvalConfig, format_table, run_eval
from jointdlm.models.causal import CausalScorer
from jointdlm.models.train import PretrainConfig, pretrain


@pytest.fixture(scope="module")
def scorer_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer")
    write_corpus("template", root / "corpus.txt", num=2000, seed=1)
    pretrain(root / "corpus.txt", root / "scorer", PretrainConfig(
        preset="tiny", objective="ar", max_steps=60, tokenizer_from=str(tiny_model_dir), progress=False,
        eval_every=60, save_every=60))
    return root / "scorer"


def test_scorer_shares_the_tokenizer(tiny_model, scorer_dir):
    scorer = CausalScorer.load(scorer_dir)
    text = "the busy bee buzzed noisily in its hive ."
    assert scorer.tokenizer.encode(text) == tiny_model.tokenizer.encode(text)
    assert scorer.max_length == tiny_model.max_length


def test_grid_writes_results_table_and_plots(tiny_model, scorer_dir, tmp_path):
    head = AdjustHead(AdjustHeadConfig.for_base(tiny_model)).requires_grad_(False)
    cfg = EvalConfig(samplers=("parallel", "adjust"), tokens_per_step=(1, 2, 4), num=24, language="template",
                     batch_size=24, mauve_seeds=(0,))
    results = run_eval(tiny_model, cfg, tmp_path, adjust_head=head, scorer=CausalScorer.load(scorer_dir))
    rows = {(r["sampler"], r["tokens_per_step"]): r for r in results["rows"]}
    assert set(rows) == {("sequential", 1), ("parallel", 2), ("parallel", 4), ("adjust", 2), ("adjust", 4)}
    for row in rows.values():
        for metric in ("validity", "tv_distance", "nll", "entropy", "length", "mauve"):
            est = row["quality"][metric]
            assert est["low"] <= est["value"] <= est["high"], (metric, est)
    # An untrained head is naive parallel: same samples, hence the same validity.
    assert rows[("adjust", 4)]["quality"]["validity"] == rows[("parallel", 4)]["quality"]["validity"]
    assert rows[("adjust", 4)]["speed"]["extra_passes_per_sample"] > 0
    assert rows[("parallel", 4)]["speed"]["base_passes_per_sample"] < rows[("sequential", 1)]["speed"][
        "base_passes_per_sample"]
    for name in ("results.json", "results.md", "quality.png", "unmasking_order.png", "reference.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| adjust | 4 |" in (tmp_path / "results.md").read_text()


def test_reference_is_generated_once(tiny_model, tmp_path, capsys):
    cfg = EvalConfig(samplers=("parallel",), tokens_per_step=(1, 2), num=8, language="template", batch_size=8)
    run_eval(tiny_model, cfg, tmp_path)
    first = (tmp_path / "reference.jsonl").read_text()
    capsys.readouterr()
    run_eval(tiny_model, cfg, tmp_path)
    assert "generating the K=1 reference" not in capsys.readouterr().err
    assert (tmp_path / "reference.jsonl").read_text() == first
    # A reference cached by code that sampled otherwise (no samples version in its key) is sampled again.
    lines = first.splitlines()
    key = json.loads(lines[0])
    del key["key"]["version"]
    (tmp_path / "reference.jsonl").write_text("\n".join([json.dumps(key), *lines[1:]]))
    run_eval(tiny_model, cfg, tmp_path)
    assert "generating the K=1 reference" in capsys.readouterr().err
    assert (tmp_path / "reference.jsonl").read_text() == first


def test_task_accuracy_through_the_cli(tiny_model_dir, tmp_path, capsys):
    # The template model's canvas has no room left after a task prompt: a clear error, not a crash.
    argv = ["eval", "--samplers", "parallel", "--tokens-per-step", "1,2", "--num", "6", "--task", "copy"]
    assert main([*argv, "--model", str(tiny_model_dir), "--out", str(tmp_path / "bad")]) == 2
    assert "leave no room to generate" in capsys.readouterr().err
    write_corpus("tasks", tmp_path / "tasks.txt", num=300, seed=0)
    pretrain(tmp_path / "tasks.txt", tmp_path / "m", PretrainConfig(preset="tiny", max_steps=3, vocab_size=300,
                                                                     seq_len=32, prompt_separator="=",
                                                                     progress=False))
    code = main([*argv, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "ev")])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert all("accuracy" in r["quality"] for r in results["rows"])
    assert results["command"].startswith("jointdlm ") and "--task copy" in results["command"]
    assert (tmp_path / "ev" / "results.md").read_text().startswith(f"Command: `{results['command']}`")


@pytest.mark.parametrize("argv, message", [
    (["--samplers", "nope"], "unknown sampler"),
    (["--samplers", "adjust"], "needs --adjust DIR"),
    (["--samplers", "edlm"], "needs --scorer DIR"),
    (["--samplers", "punt:epsilon"], "key=value"),
    (["--samplers", "punt:bogus=1"], "unknown option 'bogus' (its options: epsilon, via)"),
    (["--samplers", "adjust:taus=0.9"], "unknown option 'taus' (its options: tau, gamma, threshold, candidates)"),
    (["--samplers", "parallel:k=4"], "unknown option 'k' (it takes none)"),
    (["--tokens-per-step", "0,2"], "tokens per step"),
    (["--samplers", "parallel", "--task", "juggle"], "task"),
])
def test_bad_eval_arguments(tiny_model_dir, tmp_path, capsys, argv, message):
    code = main(["eval", "--model", str(tiny_model_dir), "--num", "4", "--out", str(tmp_path / "ev"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("jointdlm: error:") and message in err[-1]
    assert not (tmp_path / "ev" / "results.json").exists()


def test_task_prompts_come_from_the_heldout_split():
    from jointdlm.data.tasks import is_heldout
    from jointdlm.eval.runner import _prompts

    examples, prompts = _prompts(EvalConfig(task="all", num=200))
    assert len(prompts) == 200 and all(map(is_heldout, prompts))


def test_accuracy_per_task_in_results_and_table():
    from jointdlm.data.tasks import make_examples
    from jointdlm.eval.runner import _quality, format_table

    examples = make_examples(["copy", "reverse"], 6, seed=0)
    texts = [e.answer if e.task == "copy" else "wrong" for e in examples]
    quality = _quality(EvalConfig(task="all", num=6), texts, texts, None, examples, model=None)
    assert quality["accuracy"]["value"] == 0.5
    assert {t: a["value"] for t, a in quality["accuracy_by_task"].items()} == {"copy": 1.0, "reverse": 0.0}
    speed = {"base_passes_per_sample": 1.0, "extra_passes_per_sample": 0.0, "tokens_per_base_pass": 1.0,
             "tokens_per_second": 1.0, "speedup_vs_k1": None}
    table = format_table({"rows": [{"sampler": "parallel", "tokens_per_step": 2, "quality": quality, "speed": speed}]})
    assert "| sampler | K | copy | reverse |" in table and "| parallel | 2 | 1.00 | 0.00 |" in table


def test_without_a_quality_source_mauve_uses_the_base_features(tiny_model, tmp_path):
    """No language, task or scorer: the grid still compares every row with the K=1 reference."""
    cfg = EvalConfig(samplers=("parallel",), tokens_per_step=(1, 4), num=40, batch_size=40, mauve_seeds=(0,))
    results = run_eval(tiny_model, cfg, tmp_path)
    for row in results["rows"]:
        est = row["quality"]["mauve_base"]
        assert 0.0 <= est["low"] <= est["value"] <= est["high"] <= 1.0
    assert "mauve_base" in (tmp_path / "results.md").read_text()


def test_sequential_in_the_sampler_list_is_the_k1_row(tiny_model, tmp_path):
    cfg = EvalConfig(samplers=("sequential", "parallel"), tokens_per_step=(1, 2), num=8, language="template",
                     batch_size=8)
    rows = [(r["sampler"], r["tokens_per_step"]) for r in run_eval(tiny_model, cfg, tmp_path)["rows"]]
    assert rows == [("sequential", 1), ("parallel", 2)]


def test_timing_repeats_report_the_median_wall_time_of_the_same_samples(tiny_model, tmp_path, monkeypatch):
    """Timings are taken in rounds over the grid (a slow spell of the machine falls on every row alike), and each
    row's wall time and tokens/s are the median of its own."""
    from jointdlm.eval import runner

    real_run, times, calls = runner._run, iter([5.0, 3.0, 9.0, 4.0, 7.0, 1.0, 2.0]), []

    def timed(model, name, k, *args, **kwargs):
        gen = real_run(model, name, k, *args, **kwargs)
        gen.counters.wall_time_s = next(times)
        calls.append((name, k))
        return gen

    monkeypatch.setattr(runner, "_run", timed)
    cfg = EvalConfig(samplers=("parallel",), tokens_per_step=(1, 2), num=8, language="template", batch_size=8,
                     timing_repeats=3)
    rows = run_eval(tiny_model, cfg, tmp_path)["rows"]  # the reference takes the first time, 5.0
    assert calls[1:] == [("sequential", 1), ("parallel", 2)] * 3
    assert [r["speed"]["wall_time_s"] for r in rows] == [3.0, 7.0]  # medians of (3, 4, 1) and (9, 7, 2)
    assert [r["speed"]["tokens_per_second"] for r in rows] == [round(r["speed"]["generated_tokens"] / t, 2)
                                                             for r, t in zip(rows, (3.0, 7.0), strict=True)]
    assert rows[1]["speed"]["speedup_vs_k1"] == 3.0 / 7.0
    with pytest.raises(ValueError, match="timing_repeats"):
        EvalConfig(timing_repeats=0)


def test_edlm_can_sample_with_another_scorer_than_the_one_that_measures_it(tiny_model, scorer_dir, tmp_path,
                                                                          capsys, monkeypatch):
    """EDLM keeps the proposal its scorer likes best: measured by that same scorer its NLL is biased in its favour
    (results §5). `sampler_scorer` gives it another model, and without one eval says so."""
    scorer = CausalScorer.load(scorer_dir)
    other = CausalScorer.load(scorer_dir)
    cfg = EvalConfig(samplers=("edlm",), tokens_per_step=(2,), num=8, batch_size=8, mauve_seeds=(0,))
    run_eval(tiny_model, cfg, tmp_path / "shared", scorer=scorer)
    assert "samples with the scorer that measures its NLL and MAUVE" in capsys.readouterr().err
    from jointdlm.sampling import edlm

    built = []
    real = edlm.EDLMSampler.__init__

    def recording(self, *args, **kwargs):
        built.append(kwargs.get("scorer"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(edlm.EDLMSampler, "__init__", recording)
    run_eval(tiny_model, cfg, tmp_path / "apart", scorer=scorer, sampler_scorer=other)
    assert "samples with the scorer" not in capsys.readouterr().err
    assert built and all(s is other for s in built)


def test_table_marks_an_nll_row_whose_entropy_is_below_k1s():
    def row(name, k, entropy_low, entropy_high, length=(12.0, 13.0)):
        return {"sampler": name, "tokens_per_step": k,
                "quality": {"nll": {"value": 5.0, "low": 4.9, "high": 5.1},
                            "entropy": {"value": (entropy_low + entropy_high) / 2, "low": entropy_low,
                                        "high": entropy_high},
                            "length": {"value": sum(length) / 2, "low": length[0], "high": length[1]}},
                "speed": {"base_passes_per_sample": 1.0, "extra_passes_per_sample": 0.0, "tokens_per_base_pass": 4.0,
                          "tokens_per_second": 10.0, "speedup_vs_k1": 1.0}}

    table = format_table({"rows": [row("sequential", 1, 3.0, 3.2), row("parallel", 4, 2.9, 3.1),
                                   row("parallel", 8, 2.0, 2.5)]})
    lines = {line.split(" | ")[0] + line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| ")}
    assert "†" in lines["| parallel8"] and "†" not in lines["| parallel4"] and "†" not in lines["| sequential1"]
    assert "† entropy below K=1's whole interval" in table
    assert "†" not in format_table({"rows": [row("sequential", 1, 3.0, 3.2), row("parallel", 4, 2.9, 3.1)]})
    # Shorter samples have a lower entropy without repeating themselves: no mark.
    assert "†" not in format_table({"rows": [row("sequential", 1, 3.0, 3.2), row("parallel", 8, 2.0, 2.5, (8.0, 9.0))]})
