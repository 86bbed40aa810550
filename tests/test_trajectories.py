import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jointdlm.adjust.trajectories import (
    Trajectories,
    TrajectoryConfig,
    collect_trajectories,
    distributed_rank_world,
    load_trajectories,
    shard_path,
)
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.models.train import PretrainConfig, pretrain
from jointdlm.sampling.base import TokenChoice
from jointdlm.sampling.loop import SamplingConfig, encode_prompts, generate
from jointdlm.sampling.registry import make_sampler

SENTENCES = ["cat sat on the mat", "dog ran in the yard", "a bird sang in the tree",
             "the fish swam in the pond", "my cat ran on the mat", "the dog sat in the sun"]
CFG = TrajectoryConfig(num=40, length=12, temperature=1.0, rule="confidence", seed=3, shard_size=8,
                       batch_size=4, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("traj_model")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(rng.choice(SENTENCES) for _ in range(2000)) + "\n")
    pretrain(corpus, root / "model", PretrainConfig(preset="tiny", max_steps=150, vocab_size=300, seq_len=24,
                                                    progress=False, eval_every=150, save_every=150))
    return root / "model"


@pytest.fixture(scope="module")
def model(model_dir) -> BuiltinModel:
    return BuiltinModel.load(model_dir)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> tuple[Path, Trajectories]:
    out = tmp_path_factory.mktemp("traj_ref") / "data"
    stats = collect_trajectories(model, out, CFG)
    assert stats["generated"] == CFG.num and stats["skipped"] == 0
    return out, load_trajectories(out)


def assert_same(a: Trajectories, b: Trajectories) -> None:
    for key in ("prefix", "prefix_len", "tokens", "order"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.config == b.config and a.fingerprint == b.fingerprint


def test_states_and_orders(model, reference):
    out, data = reference
    mask = model.spec.mask_id
    assert len(data) == CFG.num and data.tokens.shape == (CFG.num, CFG.length)
    assert data.fingerprint == model.fingerprint()
    assert torch.equal(data.order.sort(dim=1).values, torch.arange(CFG.length).expand(CFG.num, -1))
    for i in (0, 7, 39):
        for j in range(CFG.length + 1):
            state = data.state(i, j, mask)
            filled = state != mask
            assert int(filled.sum()) == j
            assert torch.equal(state[filled], data.tokens[i][filled])
            assert torch.equal(filled, data.order[i] < j)
    rows, steps = torch.tensor([0, 5, 39]), torch.tensor([0, 4, 12])
    batched = data.states(rows, steps, mask)
    for b in range(3):
        assert torch.equal(batched[b], data.state(int(rows[b]), int(steps[b]), mask))
    assert torch.equal(data.state(3, CFG.length, mask), data.tokens[3])
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 5


def test_replay_picks_most_confident_position(model, reference):
    """The stored order is the sampler's own: under the confidence rule, the position filled from state j
    is the most confident masked position the model sees there."""
    _, data = reference
    mask = model.spec.mask_id
    for i in (0, 11):
        prefix = data.prefix[i, data.prefix.shape[1] - int(data.prefix_len[i]):]
        for j in range(CFG.length):
            canvas = torch.cat([prefix, data.state(i, j, mask)])[None]
            with torch.no_grad():
                logits = model.forward(canvas).logits[0, len(prefix):].float()
            logits[:, model.spec.never_sampled()] = -torch.inf
            conf = torch.log_softmax(logits, -1).max(-1).values.masked_fill(data.order[i] < j, -torch.inf)
            assert int(conf.argmax()) == int((data.order[i] == j).nonzero())


def test_matches_generate(model, reference):
    _, data = reference
    sampling = SamplingConfig(length=CFG.length, choice=TokenChoice(CFG.rule, CFG.temperature), seed=CFG.seed,
                              batch_size=CFG.batch_size, record_history=True, stop_at_text_end=False)
    gen = generate(model, make_sampler("sequential"), sampling, num=CFG.num)
    assert data.tokens.tolist() == gen.tokens
    assert data.order.tolist() == gen.history
    tail = generate(model, make_sampler("sequential"), sampling, num=8, index_offset=24)
    assert data.tokens[24:32].tolist() == tail.tokens


def test_two_ranks_equal_one_process(model, reference, tmp_path):
    out = tmp_path / "ranks"
    first = collect_trajectories(model, out, CFG, rank=0, world_size=2)
    with pytest.raises(FileNotFoundError, match="shard-00001"):
        load_trajectories(out)
    second = collect_trajectories(model, out, CFG, rank=1, world_size=2)
    assert (first["generated"], second["generated"]) == (24, 16)
    assert_same(load_trajectories(out), reference[1])


def test_resume_regenerates_only_missing_or_broken(model, reference, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(reference[0], out)
    shard_path(out, 2).unlink()
    stats = collect_trajectories(model, out, CFG)
    assert (stats["generated"], stats["skipped"]) == (8, 32)
    shard_path(out, 4).write_bytes(shard_path(out, 4).read_bytes()[:100])
    stats = collect_trajectories(model, out, CFG)
    assert (stats["generated"], stats["skipped"]) == (8, 32)
    assert collect_trajectories(model, out, replace(CFG, progress=True))["generated"] == 0
    assert_same(load_trajectories(out), reference[1])


KILL_SCRIPT = """
import sys, time
import torch
from jointdlm.adjust.trajectories import TrajectoryConfig, collect_trajectories
from jointdlm.models.mdlm import BuiltinModel
torch.set_num_threads(1)
model = BuiltinModel.load(sys.argv[1])
forward = model.forward
def slow_forward(*args, **kwargs):
    time.sleep(0.02)
    return forward(*args, **kwargs)
model.forward = slow_forward
cfg = TrajectoryConfig(**eval(sys.argv[3]))
collect_trajectories(model, sys.argv[2], cfg)
"""


def test_killed_collection_resumes_to_identical_data(model, model_dir, reference, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "collect.py"
    script.write_text(KILL_SCRIPT)
    fields = {k: getattr(CFG, k) for k in ("num", "length", "temperature", "rule", "seed", "shard_size",
                                           "batch_size", "progress")}
    proc = subprocess.Popen([sys.executable, str(script), str(model_dir), str(out), repr(fields)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not shard_path(out, 0).exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "collection produced no shard in 30 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    written = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert 1 <= len(written) < CFG.num_shards
    last = CFG.num_shards - 1
    (out / f".{shard_path(out, last).name}.planted.tmp").write_bytes(shard_path(out, 0).read_bytes())
    stats = collect_trajectories(model, out, CFG)
    assert stats["skipped"] == CFG.shard_size * len(written)
    assert stats["generated"] + stats["skipped"] == CFG.num
    assert not list(out.glob("*.tmp"))
    data = load_trajectories(out)
    assert_same(data, reference[1])
    index = torch.cat([load_file(str(shard_path(out, s)))["index"] for s in range(CFG.num_shards)])
    assert sorted(index.tolist()) == list(range(CFG.num))


def test_mismatch_and_incomplete_errors(model, reference, tmp_path):
    out, _ = reference
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="temperature=1.0 there, 0.5 asked for"):
        collect_trajectories(model, out, replace(CFG, temperature=0.5))
    with pytest.raises(ValueError, match="prompts differ"):
        collect_trajectories(model, out, CFG, prompts=["cat"])
    with pytest.raises(ValueError, match="fingerprint"):
        collect_trajectories(_perturbed(model), out, CFG)
    assert sorted(p.name for p in out.iterdir()) == before

    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_trajectories(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    shard_path(partial, 1).unlink()
    shard_path(partial, 3).unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 5 shards missing \(shard-00001.safetensors, "
                                                r"shard-00003.safetensors\)"):
        load_trajectories(partial)
    stray = tmp_path / "stray"
    stray.mkdir()
    shutil.copy(shard_path(out, 0), stray)
    with pytest.raises(ValueError, match="no manifest.json"):
        collect_trajectories(model, stray, CFG)


def _perturbed(model: BuiltinModel) -> BuiltinModel:
    net = type(model.net)(model.net.config)
    net.load_state_dict(model.net.state_dict())
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    return BuiltinModel(net.eval(), model.tokenizer)


def test_prompted_trajectories(model, tmp_path):
    prompts = ["the cat", "a dog ran", "my"]
    cfg = replace(CFG, num=10, shard_size=4, length=8)
    collect_trajectories(model, tmp_path / "p", cfg, prompts=prompts)
    data = load_trajectories(tmp_path / "p")
    encoded = encode_prompts(model, prompts)
    assert data.prefix.shape[1] == max(len(e) for e in encoded)
    for j in range(cfg.num):
        ids = encoded[j % len(prompts)]
        assert int(data.prefix_len[j]) == len(ids)
        assert data.prefix[j, data.prefix.shape[1] - len(ids):].tolist() == ids
        assert set(data.prefix[j, : data.prefix.shape[1] - len(ids)].tolist()) <= {model.spec.pad_id}
    sampling = SamplingConfig(length=8, choice=TokenChoice(CFG.rule, CFG.temperature), seed=CFG.seed,
                              batch_size=CFG.batch_size)
    gen = generate(model, make_sampler("sequential"), sampling, prompts=[prompts[j % 3] for j in range(4, 8)],
                   index_offset=4)
    assert data.tokens[4:8].tolist() == gen.tokens


def test_split_and_config_validation(reference):
    _, data = reference
    train, held = data.split(6)
    assert (len(train), len(held)) == (34, 6)
    assert torch.equal(held.tokens, data.tokens[34:]) and torch.equal(train.order, data.order[:34])
    with pytest.raises(ValueError, match="heldout"):
        data.split(len(data))
    for bad, match in [({"num": 0}, "num"), ({"shard_size": -1}, "shard_size"), ({"rule": "nope"}, "rule"),
                       ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"seed": -2}, "seed")]:
        with pytest.raises(ValueError, match=match):
            TrajectoryConfig(**bad)


def test_distributed_rank_world(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed_rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed_rank_world() == (2, 4)
