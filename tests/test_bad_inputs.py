"""Bad input through the command line: one `jointdlm: error:` line, exit code 2, no traceback, and no output
file left behind (an existing one stays as it was). One row per way a user can get it wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
from jointdlm.adjust.trajectories import TrajectoryConfig, collect_trajectories
from jointdlm.cli import main
from jointdlm.models.mdlm import BuiltinModel


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Every kind of broken or mismatched file the matrix points at, built once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = BuiltinModel.load(tiny_model_dir)
    paths = {"model": tiny_model_dir, "root": root}

    def model_copy(name: str) -> Path:
        target = root / name
        shutil.copytree(tiny_model_dir, target)
        return target

    paths["truncated"] = model_copy("truncated")
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    paths["broken_config"] = model_copy("broken_config")
    (paths["broken_config"] / "config.json").write_text("{'model_type': oops")
    paths["list_config"] = model_copy("list_config")
    (paths["list_config"] / "config.json").write_text("[1, 2]")
    paths["unknown_type"] = model_copy("unknown_type")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (paths["unknown_type"] / "config.json").write_text(json.dumps({**config, "model_type": "gpt17"}))
    paths["bad_tokenizer"] = model_copy("bad_tokenizer")
    (paths["bad_tokenizer"] / "tokenizer.json").write_text('{"model": ')
    paths["text_width"] = model_copy("text_width")
    (paths["text_width"] / "config.json").write_text(json.dumps({**config, "d_model": "wide"}))
    paths["small_vocab"] = model_copy("small_vocab")
    (paths["small_vocab"] / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    paths["causal"] = model_copy("causal")
    (paths["causal"] / "config.json").write_text(json.dumps({**config, "causal": True}))
    paths["no_config"] = root / "no_config"
    paths["no_config"].mkdir()
    paths["remote"] = model_copy("remote")
    (paths["remote"] / "config.json").write_text(json.dumps({"model_type": "llada", "auto_map": {
        "AutoModel": "modeling_llada.LLaDAModelLM"}}))
    (paths["remote"] / "modeling_llada.py").write_text(f"open({str(root / 'ran.txt')!r}, 'w')\n")
    paths["nan_weights"] = model_copy("nan_weights")
    broken = BuiltinModel.load(tiny_model_dir)
    with torch.no_grad():
        broken.net.output.weight[5, 0] = float("nan")
    broken.save(paths["nan_weights"])

    head = AdjustHead(AdjustHeadConfig.for_base(model))
    head.save_pretrained(root / "head")
    paths["head"] = root / "head"
    other = BuiltinModel.load(tiny_model_dir)
    with torch.no_grad():
        other.net.blocks[0].mlp.down.weight[0, 0] += 1e-3
    other.save(root / "other_model")
    paths["other_model"] = root / "other_model"
    collect_trajectories(model, root / "traj", TrajectoryConfig(num=8, length=model.max_length - 1, shard_size=8,
                                                                 progress=False))
    paths["traj"] = root / "traj"
    collect_trajectories(other, root / "other_traj", TrajectoryConfig(num=8, length=model.max_length - 1,
                                                                       shard_size=8, progress=False))
    paths["other_traj"] = root / "other_traj"
    shutil.copytree(root / "traj", root / "traj_list")
    (root / "traj_list" / "manifest.json").write_text("[]")
    paths["traj_list"] = root / "traj_list"
    shutil.copytree(root / "traj", root / "traj_trunc")
    shard = next((root / "traj_trunc").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:300])
    paths["traj_trunc"] = root / "traj_trunc"

    (root / "empty.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x9c\xff\xfe")
    (root / "corpus.txt").write_text("the cat sat\nthe dog ran\n" * 20)
    (root / "prompts.txt").write_text("the cat\n")
    (root / "a_file").write_text("not a directory")
    for name in ("empty.txt", "binary.txt", "corpus.txt", "prompts.txt", "a_file"):
        paths[name.split(".")[0].replace("_", "")] = root / name
    return paths


SAMPLE = ["sample", "--model", "{model}", "--sampler", "parallel", "--num", "2"]
MATRIX = [
    # sample: the model directory
    (["sample", "--model", "{root}/missing", "--sampler", "parallel"], "does not exist"),
    (["sample", "--model", "{afile}", "--sampler", "parallel"], "does not exist"),
    (["sample", "--model", "{no_config}", "--sampler", "parallel"], "config.json"),
    (["sample", "--model", "{broken_config}", "--sampler", "parallel"], "config.json is not valid JSON"),
    (["sample", "--model", "{list_config}", "--sampler", "parallel"], "config.json does not hold a JSON object"),
    (["sample", "--model", "{unknown_type}", "--sampler", "parallel"], "gpt17"),
    (["sample", "--model", "{truncated}", "--sampler", "parallel"], "model.safetensors"),
    (["sample", "--model", "{bad_tokenizer}", "--sampler", "parallel"], "tokenizer.json is not a valid tokenizer"),
    (["sample", "--model", "{text_width}", "--sampler", "parallel"],
     "config.json holds a bad setting: d_model must be a positive integer, got 'wide'"),
    (["sample", "--model", "{small_vocab}", "--sampler", "parallel"], "size mismatch for embedding.weight"),
    (["sample", "--model", "{remote}", "--sampler", "parallel"], "--trust-remote-code"),
    (["sample", "--model", "{causal}", "--sampler", "parallel"], "is a causal scorer"),  # it used to sample
    (["sample", "--model", "{nan_weights}", "--sampler", "parallel"], "NaN/Inf logits at step 0"),
    # sample: samplers and their options
    (SAMPLE[:4] + ["bogus"], "unknown sampler"),
    (SAMPLE[:4] + ["punt:epsilon=nan"], "not a finite number"),
    (SAMPLE[:4] + ["punt:bogus=1"], "bogus"),
    (SAMPLE[:4] + ["punt:epsilon"], "key=value"),
    (SAMPLE[:4] + ["threshold:tau=-2"], "tau"),
    (SAMPLE[:4] + ["adjust"], "--adjust"),
    (SAMPLE[:4] + ["adjust", "--adjust", "{root}/no_head"], "ADJUST head directory"),
    (["sample", "--model", "{other_model}", "--sampler", "adjust", "--adjust", "{head}"], "trained on base"),
    (SAMPLE + ["--adjust", "{head}"], "only used by the adjust sampler"),
    (SAMPLE[:4] + ["edlm"], "scorer"),
    (SAMPLE[:4] + ["adjust:tau=abc", "--adjust", "{head}"], "tau must be a finite number, got 'abc'"),
    (SAMPLE[:4] + ["adjust:candidates=2.5", "--adjust", "{head}"], "candidates must be an integer"),
    (SAMPLE[:4] + ["adjust:tau=0.9:tau=0.5", "--adjust", "{head}"], "'tau' is given twice"),
    (SAMPLE[:4] + ["threshold:factor=abc"], "factor must be a finite number"),
    # sample: numbers
    (SAMPLE + ["--temperature", "nan"], "temperature must be a finite number"),
    (SAMPLE + ["--temperature", "inf"], "temperature must be a finite number"),
    (SAMPLE + ["--temperature", "-1"], "temperature"),
    (SAMPLE + ["--top-p", "0"], "top_p"),
    (SAMPLE + ["--top-p", "nan"], "top_p"),
    (SAMPLE + ["--top-k", "-1"], "top_k"),
    (SAMPLE + ["--rule", "bogus"], "rule"),
    (SAMPLE + ["--tokens-per-step", "0"], "tokens_per_step"),
    (SAMPLE + ["--steps", "4", "--tokens-per-step", "4"], "give one"),
    (SAMPLE + ["--steps", "0"], "steps"),
    (SAMPLE + ["--block-length", "0"], "block_length"),
    (SAMPLE + ["--length", "10000"], "exceeds"),
    (SAMPLE + ["--num", "0"], "must be >= 1"),
    (SAMPLE + ["--batch-size", "x"], "invalid"),
    # sample: files and devices
    (SAMPLE + ["--prompts", "{root}/missing.txt"], "does not exist"),
    (SAMPLE + ["--prompts", "{empty}"], "no prompts"),
    (SAMPLE + ["--prompts", "{binary}"], "not UTF-8"),
    (SAMPLE + ["--prompts", "{root}"], "is a directory"),
    (SAMPLE + ["--device", "tpu9"], "tpu9"),
    (SAMPLE + ["--device", "cuda:7"], "cuda:7"),
    (SAMPLE + ["--family", "llada"], "is a built-in jointdlm model"),  # transformers used to print a line first
    # pretrain
    (["pretrain", "--corpus", "{root}/missing.txt", "--out", "{out}"], "does not exist"),
    (["pretrain", "--corpus", "{empty}", "--out", "{out}"], "empty"),
    (["pretrain", "--corpus", "{binary}", "--out", "{out}"], "binary.txt is not UTF-8"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{afile}"], "a_file"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{out}", "--preset", "gigantic"], "preset"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{out}", "--lr", "nan"], "lr must be a finite number"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{out}", "--lr", "-1"], "lr"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{out}", "--vocab-size", "10"], "vocab_size"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{out}", "--device", "cuda"], "no CUDA"),
    (["pretrain", "--corpus", "{corpus}", "--out", "{out}", "--tokenizer-from", "{root}/nothing"], "nothing"),
    # trajectories
    (["trajectories", "--model", "{model}", "--out", "{out}", "--num", "0"], "must be >= 1"),
    (["trajectories", "--model", "{model}", "--out", "{out}", "--temperature", "nan"], "temperature"),
    (["trajectories", "--model", "{model}", "--out", "{traj}", "--num", "8", "--seed", "3"], "collected differently"),
    (["trajectories", "--model", "{model}", "--out", "{out}", "--prompts", "{binary}"], "not UTF-8"),
    # train-adjust
    (["train-adjust", "--model", "{model}", "--trajectories", "{root}/none", "--out", "{out}"], "manifest.json"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{other_traj}", "--out", "{out}"], "come from base"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj_list}", "--out", "{out}"],
     "manifest.json does not hold a JSON object"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj_trunc}", "--out", "{out}"],
     "shard-00000.safetensors cannot be read"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj}", "--out", "{out}", "--rollout", "100"],
     "rollout=100 exceeds"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj}", "--out", "{out}", "--rollout", "1"],
     "rollout"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj}", "--out", "{out}", "--lr", "nan"],
     "lr must be a finite number"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj}", "--out", "{out}", "--focus", "1.5"],
     "focus"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj}", "--out", "{out}", "--onpolicy-rounds",
      "-1"], "onpolicy_rounds"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj}", "--out", "{out}", "--heldout-examples",
      "0"], "argument --heldout-examples"),
    # eval
    (["eval", "--model", "{model}", "--samplers", "bogus", "--out", "{out}"], "unknown sampler"),
    (["eval", "--model", "{model}", "--tokens-per-step", "0", "--samplers", "parallel", "--out", "{out}"],
     "tokens"),
    (["eval", "--model", "{model}", "--tokens-per-step", "1,x", "--samplers", "parallel", "--out", "{out}"],
     "argument --tokens-per-step: expected comma-separated integers"),
    (["eval", "--model", "{model}", "--language", "klingon", "--samplers", "parallel", "--out", "{out}"],
     "klingon"),
    (["eval", "--model", "{model}", "--task", "juggle", "--samplers", "parallel", "--out", "{out}"], "juggle"),
    (["eval", "--model", "{model}", "--samplers", "adjust", "--out", "{out}"], "adjust"),
    (["eval", "--model", "{model}", "--samplers", "parallel,parallel", "--out", "{out}"], "lists parallel twice"),
    (["eval", "--model", "{model}", "--samplers", "parallel", "--tokens-per-step", "1,2,2", "--out", "{out}"],
     "tokens_per_step lists 2 twice"),
    (["eval", "--model", "{model}", "--samplers", "parallel,eb:gamma=x", "--out", "{out}"],
     "gamma must be a finite number"),
    # corpus
    (["corpus", "klingon", "--out", "{out}"], "unknown corpus"),
    (["corpus", "template", "--out", "{out}", "--num", "0"], "must be >= 1"),
    (["corpus", "template", "--out", "{out}", "--num", "100000000000"], "at most 10,000,000"),  # it just ran
]


def _fill(arg: str, files: dict[str, Path], out: Path) -> str:
    values = {k: str(v) for k, v in files.items()} | {"out": str(out)}
    return arg.format(**values)


@pytest.mark.parametrize("argv, message", MATRIX, ids=[f"{m[0][0]}-{i}" for i, m in enumerate(MATRIX)])
def test_bad_input_is_one_line_and_leaves_nothing(argv, message, files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [_fill(a, files, out) for a in argv]
    if argv[0] == "sample":
        out = tmp_path / "out.jsonl"
        argv += ["--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    # Progress bars may precede the error; every other line counts.
    lines = [line for line in captured.err.splitlines() if line.strip() and "%|" not in line]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("jointdlm: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert message in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob("*.tmp")), "bad input left an output behind"
    assert not (files["root"] / "ran.txt").exists(), "a checkpoint's own code ran without --trust-remote-code"


def test_debug_env_shows_the_traceback(files, tmp_path, monkeypatch):
    monkeypatch.setenv("JOINTDLM_DEBUG", "1")
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["sample", "--model", str(files["broken_config"]), "--sampler", "parallel",
              "--out", str(tmp_path / "o.jsonl")])


def test_matrix_is_big_enough():
    assert len(MATRIX) >= 40


OUTPUTS = [
    # An output path that cannot be written fails before the work, names the path, and leaves nothing.
    (["sample", "--model", "{model}", "--sampler", "parallel", "--num", "2", "--out", "{taken}"], "is a directory"),
    (["sample", "--model", "{model}", "--sampler", "parallel", "--num", "2", "--out", "{file}/o.jsonl"],
     "is a file, not a directory"),
    (["corpus", "template", "--num", "3", "--out", "{taken}"], "is a directory"),
    (["corpus", "template", "--num", "3", "--out", ""], "output file path is empty"),
    (["trajectories", "--model", "{model}", "--num", "2", "--out", "{file}"], "is a file, not a directory"),
    (["train-adjust", "--model", "{model}", "--trajectories", "{traj}", "--out", "{file}/head"],
     "is a file, not a directory"),
    (["eval", "--model", "{model}", "--samplers", "parallel", "--num", "2", "--out", "{file}"],
     "is a file, not a directory"),
    (["eval", "--model", "{model}", "--samplers", "parallel", "--num", "2", "--length", "10000", "--out",
      "{tmp}/never"], "exceeds"),
    (["code-eval", "--model", "{model}", "--benchmark", "humaneval", "--allow-code-execution", "--data",
      "{problems}", "--length", "4", "--out", "{file}"], "is a file, not a directory"),
    (["demo", "--quick", "--workdir", "{file}/runs"], "is a file, not a directory"),
]


@pytest.mark.parametrize("argv, message", OUTPUTS, ids=[f"{m[0][0]}-{i}" for i, m in enumerate(OUTPUTS)])
def test_bad_output_path_is_one_line_and_leaves_nothing(argv, message, files, tmp_path, capsys):
    (tmp_path / "taken.jsonl").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "problems.jsonl").write_text(json.dumps({"task_id": "t/0", "prompt": "def f():\n",
                                                         "test": "assert True", "entry_point": "f"}) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    values = {"model": str(files["model"]), "traj": str(files["traj"]), "taken": str(tmp_path / "taken.jsonl"),
              "file": str(tmp_path / "a_file"), "tmp": str(tmp_path), "problems": str(tmp_path / "problems.jsonl")}
    code = main([a.format(**values) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and "%|" not in line]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("jointdlm: error: "), captured.err
    assert message in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a bad output path left something behind"
    assert not list((tmp_path / "taken.jsonl").iterdir())
    assert (tmp_path / "a_file").read_text() == "not a directory"


def test_demo_in_a_workdir_of_a_longer_run_names_the_workdir(tmp_path, capsys):
    """A quick demo where a full one trained its models stops with one line about --workdir before training
    anything (pre-training would refuse to shorten the run in words about its own --out)."""
    model_dir = tmp_path / "runs" / "template" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "training_done.json").write_text(json.dumps({"max_steps": 99999, "step": 99999}))
    code = main(["demo", "--quick", "--workdir", str(tmp_path / "runs"), "--stages", "template"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("jointdlm: error: ")]
    assert code == 2 and len(lines) == 1, err
    assert "trained for 99999 steps" in lines[0] and "--workdir" in lines[0]
    assert sorted(p.name for p in model_dir.iterdir()) == ["training_done.json"]


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from jointdlm import outputs

    def fail(*_args):
        raise OSError(28, "No space left on device")

    (tmp_path / "old.txt").write_text("old")
    monkeypatch.setattr(outputs.os, "replace", fail)
    with pytest.raises(OSError, match=r"cannot write .*old.txt: No space left on device"):
        outputs.atomic_write_text(tmp_path / "old.txt", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"] and (tmp_path / "old.txt").read_text() == "old"


@pytest.mark.parametrize("model_args, message", [
    # "no" is text to lm-eval's parser, and bool("no") is True: remote code ran on a "no".
    ("pretrained={remote},trust_remote_code=no", "trust_remote_code must be true or false, got 'no'"),
    ("pretrained={model},tokens_per_step=abc", "tokens_per_step must be an integer, got 'abc'"),
    ("pretrained={model},tokens_per_step=2.5", "tokens_per_step must be an integer, got 2.5"),
    ("pretrained={model},temperature=hot", "temperature must be a number, got 'hot'"),
    ("pretrained={model},sampler=adjust:tau=0.9:tau=0.5", "given twice"),
    ("pretrained={model},tokens_per_step=0", "tokens_per_step must be >= 1, got 0"),
])
def test_bad_lm_eval_model_args_are_one_line(model_args, message, files, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    model_args = model_args.format(model=files["model"], remote=files["remote"])
    code = main(["lm-eval", "run", "--model", "jointdlm", "--model_args", model_args, "--tasks", "jointdlm_copy",
                 "--limit", "2", "--output_path", str(tmp_path / "o")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jointdlm: error")]
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (files["root"] / "ran.txt").exists(), "a checkpoint's own code ran without trust_remote_code=true"


def test_prompts_file_with_byte_order_mark_and_crlf_reads_as_plain(files, tmp_path, capsys):
    """Windows editors save UTF-8 with a byte-order mark and CRLF line ends: the same prompts as without them (the
    mark used to become part of the first prompt, and its tokens shortened every sample)."""
    (tmp_path / "plain.txt").write_text("the cat\nthe dog\n", encoding="utf-8")
    (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbfthe cat\r\nthe dog\r\n")
    rows = {}
    for name in ("plain", "windows"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["sample", "--model", str(files["model"]), "--sampler", "parallel", "--prompts",
                     str(tmp_path / f"{name}.txt"), "--out", str(out)]) == 0, capsys.readouterr().err
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows["windows"]] == ["the cat", "the dog"]
    assert rows["windows"] == rows["plain"]


@pytest.mark.parametrize("extra, corpus, message", [
    # It used to do nothing, print "saved", and record max_steps=10 as done for a 150-step model.
    (["--preset", "tiny", "--max-steps", "10"], "own", "trained 150 steps there, max_steps=10 now"),
    # It used to continue the saved tiny network as if it were the preset asked for.
    (["--preset", "small", "--max-steps", "160"], "own", "preset='tiny' there, 'small' now"),
    # It used to continue on another corpus (cut to the saved canvas) and another held-out split without a word.
    (["--preset", "tiny", "--max-steps", "160"], "other", "trained on another corpus"),
    (["--preset", "tiny", "--max-steps", "160", "--seed", "3"], "own", "seed=0 there, 3 now"),
])
def test_pretrain_cannot_resume_a_run_with_other_settings(extra, corpus, message, files, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(files["model"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    text = files["model"].parent / "corpus.txt" if corpus == "own" else files["corpus"]  # the fixture's own corpus
    code = main(["pretrain", "--corpus", str(text), "--out", str(out), *extra])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("jointdlm: error: --out "), lines
    assert message in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a refused resume changed the run"
    assert corpus == "other" or "another corpus" not in lines[0], "the fixture's own corpus is the saved one"


def test_pretrain_failing_before_its_first_checkpoint_leaves_no_directory(files, tmp_path, capsys, monkeypatch):
    """A first run that fails in a training step (out of memory at a huge --seq-len was the case found) ends its
    progress bar's line, so the error is a line of its own, and removes the directory it made, which held only an
    empty log."""
    from jointdlm.models import train

    def fail(*_args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train, "mdlm_loss", fail)
    out = tmp_path / "model"
    code = main(["pretrain", "--corpus", str(files["corpus"]), "--out", str(out), "--preset", "tiny"])
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if line.startswith("jointdlm: error: ")]
    assert code == 1 and len(lines) == 1 and "can't allocate memory" in lines[0], err
    assert not out.exists()


def test_trajectories_error_starts_its_own_line(files, tmp_path, capsys):
    """The progress bar's line ends when a batch fails (the NaN error used to be printed after the bar)."""
    code = main(["trajectories", "--model", str(files["nan_weights"]), "--out", str(tmp_path / "t"), "--num", "4",
                 "--shard-size", "4"])
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if "jointdlm: error: " in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("jointdlm: error: "), err
    assert "NaN/Inf logits" in lines[0]
    assert not list((tmp_path / "t").glob("shard-*")), "a failed batch left a shard"


def test_train_adjust_error_starts_its_own_line(files, tmp_path, capsys, monkeypatch):
    """A training step that fails ends the progress bar's line first, so the error is a line of its own (and so does
    a failing batch of the stale-KL sweep before training)."""
    from jointdlm.adjust import train

    def fail(*_args, **_kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train, "_lr", fail)  # called first in each training step
    code = main(["train-adjust", "--model", str(files["model"]), "--trajectories", str(files["traj"]), "--out",
                 str(tmp_path / "head"), "--onpolicy-rounds", "0", "--max-steps", "5"])
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if "jointdlm: error: " in line]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("jointdlm: error: "), err
    assert "can't allocate memory" in lines[0] and "train-adjust" in err  # the bar was drawn, then ended
    monkeypatch.setattr(train, "make_batch", fail)  # the sweep's batches
    code = main(["train-adjust", "--model", str(files["model"]), "--trajectories", str(files["traj"]), "--out",
                 str(tmp_path / "head2"), "--onpolicy-rounds", "0", "--max-steps", "5"])
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.splitlines() if "jointdlm: error: " in line]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("jointdlm: error: "), err


def test_jsonl_suffix_in_any_case(files, tmp_path):
    """`--out samples.JSONL` is a JSONL file name (it was refused as not ending in .jsonl)."""
    out = tmp_path / "samples.JSONL"
    code = main(["sample", "--model", str(files["model"]), "--sampler", "parallel", "--num", "2", "--out", str(out)])
    assert code == 0 and len(out.read_text().splitlines()) == 2


def test_prompts_from_a_pipe(files, tmp_path, capsys):
    """`--prompts <(grep ... file)` hands over /dev/fd/N, a pipe and not a regular file: it used to be refused as
    'does not exist'."""
    import os

    if not Path("/dev/fd").is_dir():
        pytest.skip("no /dev/fd")
    read, write = os.pipe()
    os.write(write, b"the cat\nthe dog\n")
    os.close(write)
    out = tmp_path / "o.jsonl"
    try:
        code = main(["sample", "--model", str(files["model"]), "--sampler", "parallel", "--prompts",
                     f"/dev/fd/{read}", "--out", str(out)])
    finally:
        os.close(read)
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["the cat", "the dog"]


def test_corpus_with_byte_order_mark_reads_as_plain(tmp_path):
    """A corpus saved as UTF-8 with a byte-order mark: the mark is not part of the first document."""
    from jointdlm.data import read_corpus
    from jointdlm.models.train import read_documents

    (tmp_path / "c.txt").write_bytes(b"\xef\xbb\xbfthe cat sat\r\nthe dog ran\r\n")
    assert read_documents(tmp_path / "c.txt") == ["the cat sat", "the dog ran"]
    assert read_corpus(tmp_path / "c.txt")[0] == "the cat sat"


@pytest.mark.parametrize("content, benchmark, message", [
    (b"\x89PNG\r\n\x00\xff", "humaneval", "problems.jsonl is not UTF-8 text"),  # said only "'utf-8' codec can't ..."
    (b"[1, 2]\n", "humaneval", "problems.jsonl:1: a humaneval problem is a JSON object, got list"),
    (b'{"task_id": 5, "prompt": 3, "test": "", "entry_point": "f"}\n', "humaneval",  # exit 1, TypeError
     "problems.jsonl:1: prompt must be a string, got 3"),
    (b'{"task_id": 1, "text": "x", "test_list": "assert 1"}\n', "mbpp",
     "test_list must be a non-empty list of strings"),
])
def test_bad_code_eval_problem_file_is_one_line(content, benchmark, message, files, tmp_path, capsys):
    (tmp_path / "problems.jsonl").write_bytes(content)
    out = tmp_path / "out"
    code = main(["code-eval", "--model", str(files["model"]), "--benchmark", benchmark, "--allow-code-execution",
                 "--data", str(tmp_path / "problems.jsonl"), "--length", "4", "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("jointdlm: error: "), lines
    assert message in lines[0], lines[0]
    assert not out.exists()


def test_code_eval_problem_file_with_byte_order_mark(files, tmp_path, capsys):
    (tmp_path / "problems.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(
        {"task_id": "t/0", "prompt": "def f():\n", "test": "assert True", "entry_point": "f"}).encode() + b"\n")
    code = main(["code-eval", "--model", str(files["model"]), "--benchmark", "humaneval", "--allow-code-execution",
                 "--data", str(tmp_path / "problems.jsonl"), "--length", "4", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["problems"][0]["task_id"] == "t/0"


def test_lm_eval_batch_size_auto_with_a_count(files):
    """lm-eval's `--batch_size auto:4` reaches the model as the text 'auto:4': auto, as plain 'auto' is."""
    pytest.importorskip("lm_eval")
    from jointdlm.eval.harness import register

    model = register()(pretrained=str(files["model"]), batch_size="auto:4")
    assert model.batch == 16
