"""The command line, in process (`jointdlm.cli.main`) plus one check that the console script is installed."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jointdlm.cli import main
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.models.tokenizer import EOS_ID


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sample_writes_jsonl_and_summary(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "samples.jsonl"
    rc = main(["sample", "--model", str(tiny_model_dir), "--sampler", "parallel", "--tokens-per-step", "3",
               "--num", "5", "--batch-size", "2", "--history", "--seed", "4", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    rows = read_jsonl(out)
    model = BuiltinModel.load(tiny_model_dir)
    length = model.max_length - 1  # default fills the canvas after BOS
    assert [r["index"] for r in rows] == list(range(5))
    assert any(EOS_ID in r["tokens"] for r in rows), "the trained model should end some samples with EOS"
    for r in rows:
        assert r["prompt"] == ""
        assert len(r["tokens"]) == length and len(r["history"]) == length
        assert model.spec.mask_id not in r["tokens"]
        cut = r["tokens"][: r["tokens"].index(EOS_ID)] if EOS_ID in r["tokens"] else r["tokens"]
        assert r["text"] == model.tokenizer.decode(cut)
        assert "<eos>" not in r["text"] and "<mask>" not in r["text"]
    summary = [line for line in err.splitlines() if "NFE" in line]
    assert len(summary) == 1
    assert f"NFE {-(-length // 3):.1f}/sample" in summary[0] and str(out) in summary[0]
    assert not list(out.parent.glob("*.tmp"))


def test_sample_with_prompts_and_sequential(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nthe busy bee buzzed\n", encoding="utf-8")
    out = tmp_path / "p.jsonl"
    args = ["sample", "--model", str(tiny_model_dir), "--sampler", "sequential", "--prompts", str(prompts),
            "--length", "6", "--rule", "left_to_right", "--temperature", "0", "--history", "--out", str(out)]
    rc = main([*args, "--whole-canvas"])
    err = capsys.readouterr().err
    assert rc == 0, err
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["the cat", "the busy bee buzzed"]
    assert all(r["history"] == list(range(6)) for r in rows)
    assert "NFE 6.0/sample" in err
    # By default a sample stops at its text's end: the same texts, the positions after it never sampled.
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 0, err
    stopped = read_jsonl(out)
    assert [r["text"] for r in stopped] == [r["text"] for r in rows]
    assert any(-1 in r["history"] for r in stopped) and "NFE 6.0/sample" not in err
    for whole, row in zip(rows, stopped, strict=True):
        decided = [i for i, h in enumerate(row["history"]) if h >= 0]
        assert row["history"] == list(range(len(decided))) + [-1] * (6 - len(decided))
        assert row["tokens"][:len(decided)] == whole["tokens"][:len(decided)]


def test_sample_says_when_a_sampler_sizes_its_own_steps(tiny_model_dir, tmp_path, capsys):
    """The training-free adaptive samplers ignore K: the summary says "adaptive", and a K given to one is named as
    having no effect (the samples are those without it)."""
    def run(*extra: str) -> tuple[str, list[dict]]:
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.jsonl"
        rc = main(["sample", "--model", str(tiny_model_dir), "--num", "3", "--seed", "2", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 0, err
        return err, read_jsonl(out)

    plain, rows = run("--sampler", "threshold")
    given, rows_given = run("--sampler", "threshold", "--tokens-per-step", "4")
    assert "threshold adaptive:" in plain and "warning" not in plain
    assert "warning: the threshold sampler decides how many tokens each step writes; --tokens-per-step has no effect" \
        in given and "threshold adaptive:" in given
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in rows_given]
    assert "--steps has no effect" in run("--sampler", "eb", "--steps", "4")[0]
    fixed, _ = run("--sampler", "parallel", "--tokens-per-step", "4")
    assert "warning" not in fixed and "parallel K=4:" in fixed


def run_bad(args: list[str], capsys, out: Path | None = None) -> str:
    rc = main(args)
    captured = capsys.readouterr()
    assert rc != 0
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("jointdlm: error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    if out is not None:
        assert not out.exists()
        assert not out.with_name(out.name + ".tmp").exists()
    return lines[0]


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "bogus"], "unknown sampler"),
    (["--sampler", "parallel", "--tokens-per-step", "0"], "tokens_per_step"),
    (["--sampler", "sequential", "--tokens-per-step", "2"], "token per step"),
    (["--sampler", "sequential", "--steps", "3"], "token per step"),
    (["--sampler", "parallel", "--steps", "500"], "steps"),
    (["--sampler", "parallel", "--rule", "nope"], "rule"),
    (["--sampler", "parallel", "--top-p", "0"], "top_p"),
    (["--sampler", "parallel", "--length", "500"], "exceeds"),
    (["--sampler", "adjust"], "--adjust"),
    (["--sampler", "parallel", "--adjust", "somewhere"], "--adjust"),
])
def test_sample_bad_arguments(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.jsonl"
    line = run_bad(["sample", "--model", str(tiny_model_dir), "--num", "2", "--out", str(out), *extra], capsys, out)
    assert message in line


def test_sample_bad_inputs_leave_existing_output_untouched(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "keep.jsonl"
    out.write_text('{"precious": true}\n')
    base = ["sample", "--sampler", "parallel", "--num", "2", "--out", str(out)]
    run_bad([*base, "--model", str(tmp_path / "no_such_model")], capsys)
    run_bad([*base, "--model", str(tiny_model_dir), "--sampler", "bogus"], capsys)

    long_prompts = tmp_path / "long.txt"
    long_prompts.write_text("the cat\n" + " ".join(["the busy bee buzzed noisily"] * 20) + "\n")
    run_bad([*base, "--model", str(tiny_model_dir), "--prompts", str(long_prompts)], capsys)
    line = run_bad([*base, "--model", str(tiny_model_dir), "--prompts", str(long_prompts), "--length", "4"], capsys)
    assert "exceeds" in line

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in run_bad([*base, "--model", str(tiny_model_dir), "--prompts", str(empty)], capsys)
    run_bad([*base, "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "missing.txt")], capsys)
    assert out.read_text() == '{"precious": true}\n'
    txt = tmp_path / "samples.txt"
    assert ".jsonl" in run_bad(["sample", "--model", str(tiny_model_dir), "--sampler", "parallel", "--out", str(txt)],
                               capsys)
    assert not txt.exists()


def test_pretrain_and_corpus_bad_arguments(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "model"
    assert "empty" in run_bad(["pretrain", "--corpus", str(empty), "--out", str(out), "--max-steps", "2"], capsys)
    assert not out.exists()
    run_bad(["pretrain", "--corpus", str(tmp_path / "missing.txt"), "--out", str(out)], capsys)
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document\nanother one\n")
    assert "preset" in run_bad(["pretrain", "--corpus", str(corpus), "--out", str(out), "--preset", "gigantic"],
                               capsys)
    assert "objective" in run_bad(["pretrain", "--corpus", str(corpus), "--out", str(out), "--objective", "x"],
                                  capsys)
    assert not out.exists()
    target = tmp_path / "corpus.txt"
    assert "unknown corpus" in run_bad(["corpus", "klingon", "--out", str(target)], capsys)
    assert not target.exists()


def test_corpus_then_pretrain_then_sample(tmp_path, capsys):
    corpus, model_dir = tmp_path / "c.txt", tmp_path / "m"
    assert main(["corpus", "template", "--out", str(corpus), "--num", "50"]) == 0
    assert len(corpus.read_text().splitlines()) == 50
    assert "wrote 50 documents" in capsys.readouterr().err
    rc = main(["pretrain", "--corpus", str(corpus), "--out", str(model_dir), "--preset", "tiny", "--max-steps", "5",
               "--vocab-size", "400", "--batch-size", "8"])
    assert rc == 0
    assert "parameter model" in capsys.readouterr().err
    model = BuiltinModel.load(model_dir)
    assert json.loads((model_dir / "training_done.json").read_text())["step"] == 5
    assert model.tokenizer.vocab_size <= 400 and model.net.config.n_layers == 2
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--model", str(model_dir), "--sampler", "parallel", "--tokens-per-step", "4",
                 "--num", "3", "--out", str(out)]) == 0
    assert len(read_jsonl(out)) == 3


def test_argparse_errors_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", "x", "--sampler", "parallel", "--num", "0", "--out", "o.jsonl"])
    assert exc.value.code != 0
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code != 0


def test_console_script_installed():
    script = Path(sys.executable).parent / "jointdlm"
    assert script.exists(), f"console script missing at {script}"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("corpus", "pretrain", "sample", "trajectories", "train-adjust"):
        assert command in proc.stdout


def test_demo_quick_runs_one_stage_end_to_end(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--quick", "--stages", "template", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "## template" in out and "## english" not in out
    results = json.loads((work / "template" / "eval" / "results.json").read_text())
    assert "--quick --stages template" in results["command"]
    rows = {(r["sampler"], r["tokens_per_step"]) for r in results["rows"]}
    assert rows == {("sequential", 1), ("parallel", 2), ("parallel", 4), ("adjust", 2), ("adjust", 4)}
    assert all("validity" in r["quality"] for r in results["rows"])
    assert (work / "template" / "eval" / "quality.png").exists()
    assert not (work / "english").exists()
    # A head cached by an older recipe is kept beside and trained again, not refused.
    state_path = work / "template" / "adjust" / "adjust_trainer_state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    state["config"] = {**state["config"], "rollout": 3}
    torch.save(state, state_path)
    assert main(["demo", "--quick", "--stages", "template", "--workdir", str(work)]) == 0
    err = capsys.readouterr().err
    assert "the cached head was trained with other settings (rollout=3 there" in err
    assert (work / "template" / "adjust.previous-1" / "adjust.safetensors").exists()
    config = json.loads((work / "template" / "adjust" / "adjust_config.json").read_text())
    assert config["training"]["rollout"] == 11


def test_demo_rejects_an_unknown_stage(tmp_path, capsys):
    assert main(["demo", "--stages", "klingon", "--workdir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("jointdlm: error:") and "no stage named klingon" in err[-1] and "template" in err[-1]
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("command,config_path", [
    ("pretrain", "jointdlm.models.train:PretrainConfig"),
    ("trajectories", "jointdlm.adjust.trajectories:TrajectoryConfig"),
    ("train-adjust", "jointdlm.adjust.train:AdjustTrainConfig"),
])
def test_long_commands_default_to_the_api_defaults(command, config_path):
    """One default path: a flag left out means what the config's field means when left out (train-adjust's
    --patience once defaulted to 4 where the API, the demo and the benchmarks used 3)."""
    import dataclasses
    import importlib

    from jointdlm.cli import build_parser

    module, name = config_path.split(":")
    config = getattr(importlib.import_module(module), name)
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    compared = {a.dest: (a.default, defaults[a.dest]) for a in sub._actions
                if a.dest in defaults and a.default is not None and a.dest not in ("progress",)}
    assert len(compared) >= 5, compared
    assert {k: v for k, v in compared.items() if v[0] != v[1]} == {}
