"""The evaluation grid end to end on tiny models: files written, metrics present, reference cached."""

from __future__ import annotations

import json

import pytest

from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
from jointdlm.cli import main
from jointdlm.data import write_corpus
from jointdlm.eval.runner import EvalConfig, run_eval
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
        for metric in ("validity", "tv_distance", "nll", "mauve"):
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


def test_task_accuracy_through_the_cli(tiny_model_dir, tmp_path, capsys):
    code = main(["eval", "--model", str(tiny_model_dir), "--samplers", "parallel", "--tokens-per-step", "1,2",
                 "--num", "6", "--task", "copy", "--out", str(tmp_path / "ev")])
    assert code == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert all("accuracy" in r["quality"] for r in results["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--samplers", "nope"], "unknown sampler"),
    (["--samplers", "adjust"], "needs --adjust DIR"),
    (["--samplers", "edlm"], "needs --scorer DIR"),
    (["--samplers", "punt:epsilon"], "key=value"),
    (["--samplers", "punt:bogus=1"], "bad options"),
    (["--tokens-per-step", "0,2"], "tokens per step"),
    (["--samplers", "parallel", "--task", "juggle"], "task"),
])
def test_bad_eval_arguments(tiny_model_dir, tmp_path, capsys, argv, message):
    code = main(["eval", "--model", str(tiny_model_dir), "--num", "4", "--out", str(tmp_path / "ev"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("jointdlm: error:") and message in err[-1]
    assert not (tmp_path / "ev" / "results.json").exists()
