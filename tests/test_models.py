"""The built-in model family: tokenizer, network, save/load, fingerprint, pre-training and its resume."""

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from jointdlm.data import write_corpus
from jointdlm.models.loading import load_model
from jointdlm.models.mdlm import (
    CONFIG_FILE,
    PRESETS,
    WEIGHTS_FILE,
    BuiltinModel,
    MaskedDiffusionTransformer,
    MDLMConfig,
    weights_fingerprint,
)
from jointdlm.models.protocol import DiffusionLM, FamilySpec
from jointdlm.models.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, BPETokenizer
from jointdlm.models.train import (
    LOG_FILE,
    PRESET_LR,
    STATE_FILE,
    PretrainConfig,
    encode_documents,
    mdlm_loss,
    pretrain,
    random_cut,
    split_prompt,
    target_steps,
)

TEXTS = [
    "the cat sat on the mat.",
    "naïve café — 東京",
    "emoji 🙂 and ñandú, Ünïcödé ß",
    "   leading and   inner   spaces   ",
    "def f(x):\n\treturn x + 1\n\n\nclass A:\n    pass\n",
    "tabs\t\tand\r\nwindows line ends\n",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    corpus = ["the cat sat on the mat", "def f(x): return x", "naïve café"] * 50
    return BPETokenizer.train(corpus, vocab_size=320)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "template.txt"
    write_corpus("template", path, num=400, seed=1)
    return path


def random_net(vocab=300, max_length=16, causal=False, seed=0) -> MaskedDiffusionTransformer:
    torch.manual_seed(seed)
    net = MaskedDiffusionTransformer(MDLMConfig(vocab_size=vocab, max_length=max_length, d_model=32, n_layers=2,
                                                n_heads=4, causal=causal))
    return net.eval()


# ---------------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_tokenizer_special_ids_fixed_and_never_encoded(tokenizer, tiny_model):
    assert (PAD_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 3)
    for tok in (tokenizer, tiny_model.tokenizer):
        for text in ("hello <mask> world", "<eos>", "a<pad>b<bos>c", "<mask><mask>"):
            ids = tok.encode(text)
            assert min(ids) >= len(SPECIAL_TOKENS), f"{text!r} encoded to special ids {ids}"
            assert tok.decode(ids) == text


def test_tokenizer_decode_drops_specials(tokenizer):
    ids = tokenizer.encode("the cat")
    assert tokenizer.decode([BOS_ID, *ids[:1], MASK_ID, *ids[1:], EOS_ID, PAD_ID, PAD_ID]) == "the cat"
    assert tokenizer.decode([MASK_ID, MASK_ID]) == ""
    pieces = tokenizer.decode_tokens([BOS_ID, *ids, MASK_ID])
    assert pieces[0] == "<bos>" and pieces[-1] == "<mask>" and "".join(pieces[1:-1]) == "the cat"


def test_tokenizer_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = BPETokenizer.load(tmp_path)
    assert again.vocab_size == tokenizer.vocab_size
    for text in TEXTS + ["x <mask> y"]:
        assert again.encode(text) == tokenizer.encode(text)
    with pytest.raises(FileNotFoundError):
        BPETokenizer.load(tmp_path / "nowhere")


def test_tokenizer_learned_merges(tokenizer):
    assert len(tokenizer.encode("the cat sat on the mat")) < len("the cat sat on the mat")


# ------------------------------------------------------------------------------------------------------- network


def test_forward_shapes_and_protocol(tiny_model):
    assert isinstance(tiny_model, DiffusionLM)
    v, d = tiny_model.spec.vocab_size, tiny_model.hidden_size
    tokens = torch.randint(4, v, (3, 10))
    out = tiny_model.forward(tokens)
    assert out.logits.shape == (3, 10, v) and out.hidden.shape == (3, 10, d)
    assert torch.isfinite(out.logits).all()
    assert torch.allclose(tiny_model.lm_head(out.hidden), out.logits, atol=1e-5)
    at = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) < 0.3
    selected = tiny_model.forward(tokens, at=at)
    assert selected.logits.shape == (int(at.sum()), v) and torch.equal(selected.hidden, out.hidden)
    assert torch.allclose(selected.logits, out.logits[at], atol=1e-5)
    assert tiny_model.embed(tokens).shape == (3, 10, d)
    assert tiny_model.spec.mask_id == MASK_ID and tiny_model.spec.bos_id == BOS_ID
    assert sorted(tiny_model.spec.never_sampled()) == [BOS_ID, MASK_ID]
    with pytest.raises(ValueError, match="max_length"):
        tiny_model.forward(torch.full((1, tiny_model.max_length + 1), 5))


def test_bidirectional_vs_causal():
    tokens = torch.randint(4, 300, (1, 12))
    later = tokens.clone()
    later[0, 9] = (later[0, 9] + 1 - 4) % 296 + 4
    with torch.no_grad():
        bi = random_net()
        a, b = bi(tokens)[0], bi(later)[0]
        assert (a[0, 2] - b[0, 2]).abs().max() > 1e-4, "MDLM position 2 must see token 9"
        causal = random_net(causal=True)
        a, b = causal(tokens)[0], causal(later)[0]
        assert torch.allclose(a[0, :9], b[0, :9], atol=1e-6), "causal positions < 9 must not see token 9"
        assert (a[0, 9] - b[0, 9]).abs().max() > 1e-4
        # the same with an explicit attention mask (the other attention path)
        ones = torch.ones_like(tokens)
        a, b = causal(tokens, ones)[0], causal(later, ones)[0]
        assert torch.allclose(a[0, :9], b[0, :9], atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_invariance(causal):
    net = random_net(causal=causal, seed=3)
    seq = torch.randint(4, 300, (1, 9))
    pad = 4
    padded = torch.cat([torch.full((1, pad), PAD_ID), seq], dim=1)
    padded[0, :pad] = torch.tensor([7, 100, 250, 0])  # junk under the pads must not matter either
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone, h_alone = net(seq)
        alone_masked, _ = net(seq, torch.ones_like(seq))
        padded_out, h_padded = net(padded, mask)
    assert torch.isfinite(padded_out).all()
    assert (alone - padded_out[:, pad:]).abs().max() < 1e-5
    assert (h_alone - h_padded[:, pad:]).abs().max() < 1e-5
    assert (alone - alone_masked).abs().max() < 1e-5
    # and without the mask, the pads do change the result (so the check above is not vacuous)
    with torch.no_grad():
        unmasked, _ = net(padded)
    assert (alone - unmasked[:, pad:]).abs().max() > 1e-4


def test_batched_padding_matches_single(tiny_model):
    """Two rows of different lengths in one left-padded batch give the per-row logits to 1e-5."""
    a = torch.tensor([[BOS_ID, 300, 301, 302, 303, MASK_ID, MASK_ID]])
    b = torch.tensor([[BOS_ID, 400, MASK_ID, MASK_ID]])
    batch = torch.cat([a, torch.cat([torch.full((1, 3), PAD_ID), b], 1)])
    att = torch.ones_like(batch)
    att[1, :3] = 0
    out = tiny_model.forward(batch, att).logits
    assert (out[0] - tiny_model.forward(a).logits[0]).abs().max() < 1e-5
    assert (out[1, 3:] - tiny_model.forward(b).logits[0]).abs().max() < 1e-5


def test_config_validation():
    with pytest.raises(ValueError):
        MDLMConfig(vocab_size=300, d_model=30, n_heads=4)
    with pytest.raises(ValueError):
        MDLMConfig(vocab_size=0)
    assert MDLMConfig(vocab_size=300, d_model=64).mlp_hidden % 32 == 0
    with pytest.raises(ValueError, match="outside"):
        FamilySpec(name="x", vocab_size=10, mask_id=10, pad_id=0, eos_id=1)


# ------------------------------------------------------------------------------------------ save, load, fingerprint


def test_save_load_round_trip(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "copy")
    again = BuiltinModel.load(tmp_path / "copy")
    tokens = torch.randint(4, tiny_model.spec.vocab_size, (2, 12))
    assert torch.equal(tiny_model.forward(tokens).logits, again.forward(tokens).logits)
    assert again.fingerprint() == tiny_model.fingerprint()
    assert len(tiny_model.fingerprint()) == 16
    assert again.net.config == tiny_model.net.config
    assert not any(p.requires_grad for p in again.net.parameters()) and not again.net.training
    assert isinstance(load_model(tmp_path / "copy"), BuiltinModel)


def test_fingerprint_tracks_weights_and_config(tiny_model_dir):
    model = BuiltinModel.load(tiny_model_dir)
    fp = model.fingerprint()
    with torch.no_grad():
        model.net.blocks[1].mlp.down.weight[3, 5] += 1e-3
    changed = BuiltinModel(model.net, model.tokenizer).fingerprint()
    assert changed != fp
    state = load_file(str(tiny_model_dir / WEIGHTS_FILE))
    config = json.loads((tiny_model_dir / CONFIG_FILE).read_text())
    arch = {k: v for k, v in config.items() if k in MDLMConfig.__dataclass_fields__}
    assert weights_fingerprint(arch, state) == fp
    assert weights_fingerprint({**arch, "rope_theta": 500.0}, state) != fp


def test_load_errors(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        BuiltinModel.load(empty)
    with pytest.raises(FileNotFoundError):
        load_model(empty)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_model_dir, no_config)
    (no_config / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        BuiltinModel.load(no_config)
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_model_dir, wrong)
    config = json.loads((wrong / CONFIG_FILE).read_text())
    (wrong / CONFIG_FILE).write_text(json.dumps({**config, "model_type": "llada"}))
    with pytest.raises(ValueError, match="model_type"):
        BuiltinModel.load(wrong)
    with pytest.raises(ValueError, match="not supported"):
        load_model(wrong)


# ------------------------------------------------------------------------------------------------- pre-training


def quick_cfg(**kw) -> PretrainConfig:
    base = {"preset": "tiny", "batch_size": 16, "vocab_size": 300, "progress": False, "eval_every": 10,
            "save_every": 10, "seed": 0}
    return PretrainConfig(**{**base, **kw})


def log_steps(directory) -> list[int]:
    return [json.loads(line)["step"] for line in (directory / LOG_FILE).read_text().splitlines()]


def test_pretrain_resume_continues_and_matches_uninterrupted(small_corpus, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    pretrain(small_corpus, resumed, quick_cfg(max_steps=20))
    assert torch.load(resumed / STATE_FILE, weights_only=False)["step"] == 20
    assert log_steps(resumed) == [10, 20]
    pretrain(small_corpus, resumed, quick_cfg(max_steps=40))
    assert log_steps(resumed) == [10, 20, 30, 40], "resume must start from step 20, not 0"
    assert torch.load(resumed / STATE_FILE, weights_only=False)["step"] == 40
    assert json.loads((resumed / "training_done.json").read_text())["step"] == 40

    straight = tmp_path / "straight"
    pretrain(small_corpus, straight, quick_cfg(max_steps=40))
    a, b = load_file(str(resumed / WEIGHTS_FILE)), load_file(str(straight / WEIGHTS_FILE))
    # warmup_steps=100 > 40, so the learning-rate schedule does not depend on max_steps: resuming is exact.
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed weights differ from an uninterrupted run by {diff}"
    assert BuiltinModel.load(resumed).fingerprint() == BuiltinModel.load(straight).fingerprint()

    # a run that is already done is a no-op, also when max_steps is left to the default (6,000 now): a resumed
    # run keeps its own target, so re-running a command from before the default changed trains nothing
    before = (resumed / WEIGHTS_FILE).read_bytes()
    pretrain(small_corpus, resumed, quick_cfg(max_steps=40))
    assert (resumed / WEIGHTS_FILE).read_bytes() == before and log_steps(resumed) == [10, 20, 30, 40]
    capsys.readouterr()
    pretrain(small_corpus, resumed, replace(quick_cfg(max_steps=40), max_steps=None, progress=True))
    assert (resumed / WEIGHTS_FILE).read_bytes() == before and log_steps(resumed) == [10, 20, 30, 40]
    assert "finished 40-step pre-training run: nothing to train" in capsys.readouterr().err


def test_pretrain_loss_decreases(small_corpus, tmp_path):
    model = pretrain(small_corpus, tmp_path / "m", quick_cfg(max_steps=100, eval_every=25, save_every=100,
                                                              warmup_steps=10))
    records = [json.loads(line) for line in (tmp_path / "m" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [25, 50, 75, 100]
    held = [r["heldout_loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(held)))
    print(f"\nheld-out MDLM loss over training: {held}")
    assert held[-1] < held[0] * 0.9
    assert held[-1] < 5.0
    assert not model.net.training and (tmp_path / "m" / "training_done.json").exists()
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert config["pretrain"]["max_steps"] == 100 and config["causal"] is False
    moved = json.loads((tmp_path / "m" / "training_done.json").read_text())["heldout"]
    assert (moved["from_step"], moved["to_step"]) == (75, 100)
    assert moved["drop"] == pytest.approx((held[2] - held[3]) / held[2], abs=1e-4)


def test_a_base_still_learning_is_named(tmp_path, small_corpus, capsys):
    """The held-out loss of the run's last quarter: falling by more than 5% means the base has not converged
    (a 2,000-step binding base fell 19% there; bases that had learned their language 0.8-2.3%)."""
    from jointdlm.cli import main
    from jointdlm.models.train import convergence, format_convergence

    def log(values: list[float]):
        path = tmp_path / f"log{len(values)}_{values[-1]}.jsonl"
        path.write_text("".join(json.dumps({"step": 250 * (i + 1), "heldout_loss": v}) + "\n"
                                for i, v in enumerate(values)))
        return path

    falling = convergence(log([0.93, 0.91, 0.90, 0.90, 0.84, 0.75, 0.68, 0.61]))
    assert falling["still_falling"] and (falling["from_step"], falling["to_step"]) == (1500, 2000)
    assert falling["drop"] == pytest.approx(0.19, abs=0.005)
    assert "(e.g. 4000)" in format_convergence({"step": 2000, "heldout": falling})
    flat = convergence(log([0.55, 0.46, 0.451, 0.450, 0.448, 0.446, 0.446, 0.445]))
    assert not flat["still_falling"] and format_convergence({"step": 2000, "heldout": flat}) is None
    assert convergence(log([0.9, 0.5, 0.4])) is None and convergence(tmp_path / "none.jsonl") is None
    # The CLI prints the warning exactly when the run's own record says so.
    out = tmp_path / "cli_base"
    assert main(["pretrain", "--corpus", str(small_corpus), "--out", str(out), "--preset", "tiny", "--max-steps", "40",
                 "--eval-every", "10", "--batch-size", "16", "--vocab-size", "300"]) == 0
    still = json.loads((out / "training_done.json").read_text())["heldout"]["still_falling"]
    assert still  # 40 steps of a tiny base: far from converged (-10% over the last 10 steps in this run)
    assert "warning: held-out loss still falling" in capsys.readouterr().err


def test_pretrain_ar_objective_is_causal(small_corpus, tmp_path):
    model = pretrain(small_corpus, tmp_path / "ar", quick_cfg(objective="ar", max_steps=3, seq_len=24))
    assert model.net.config.causal and model.max_length == 24
    assert BuiltinModel.load(tmp_path / "ar").net.config.causal


@pytest.mark.parametrize("kwargs", [{"preset": "huge"}, {"objective": "bert"}, {"max_steps": 0}, {"lr": 0.0},
                                    {"vocab_size": 100}, {"heldout_fraction": 0.0}, {"batch_size": 0},
                                    {"prompt_separator": " "}, {"prompt_separator": "=", "objective": "ar"}])
def test_pretrain_config_rejects(kwargs):
    with pytest.raises(ValueError):
        PretrainConfig(**kwargs)


def test_pretrain_learning_rate_follows_the_preset():
    """Unless given, the peak rate is the preset's: `small` stalls on copy and exclusion languages at the narrow
    presets' 3e-3 (docs/results.md §10). The step count is the objective's: a diffusion base samples better at
    6,000 than at 2,000 on every language measured, at held-out losses within 4%."""
    assert target_steps(PretrainConfig()) == 6000 and target_steps(PretrainConfig(objective="ar")) == 2000
    assert target_steps(PretrainConfig(max_steps=5)) == 5
    assert target_steps(PretrainConfig(), saved=2000) == 2000, "a resumed run keeps its own target unless told"
    assert target_steps(PretrainConfig(max_steps=8000), saved=2000) == 8000
    assert set(PRESET_LR) == set(PRESETS)
    assert PretrainConfig().lr == PRESET_LR["small"] == 5e-4
    assert PretrainConfig(preset="tiny").lr == 3e-3
    assert PretrainConfig(preset="small", lr=1e-3).lr == 1e-3


def test_pretrain_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(ValueError, match="empty"):
        pretrain(empty, tmp_path / "out1", quick_cfg(max_steps=2))
    with pytest.raises(FileNotFoundError):
        pretrain(tmp_path / "missing.txt", tmp_path / "out2", quick_cfg(max_steps=2))
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------- prompt-conditioned training

PAIRS = ["copy : ann bob = ann bob", "reverse : ann bob tom = tom bob ann", "add : 1 2 + 3 4 = 4 6"]


class RecordingNet:
    """Stands in for the network: uniform logits, and remembers what it was shown."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.seen = vocab, []

    def trunk(self, tokens):
        self.seen.append(tokens.clone())
        return torch.zeros(*tokens.shape, 1)

    def head(self, hidden):
        return torch.zeros(*hidden.shape[:-1], self.vocab)


def test_prompt_pairs_encode_like_whole_documents(tokenizer):
    whole, whole_context = encode_documents(tokenizer, PAIRS, 24)
    rows, context = encode_documents(tokenizer, PAIRS, 24, "=")
    assert torch.equal(rows, whole), "splitting at the separator must not change the tokens"
    assert whole_context.tolist() == [1, 1, 1]
    for row, n, doc in zip(rows, context.tolist(), PAIRS, strict=True):
        assert row[0] == BOS_ID
        assert tokenizer.decode(row[1:n].tolist()) == split_prompt(doc, "=")[0]
    assert split_prompt("a = b = c", "=") == ("a =", " b = c")
    with pytest.raises(ValueError, match="no prompt separator"):
        encode_documents(tokenizer, ["copy : ann bob"], 24, "=")
    with pytest.raises(ValueError, match="fills the whole canvas"):
        encode_documents(tokenizer, PAIRS, 4, "=")


def test_mdlm_loss_never_masks_the_prompt(tokenizer):
    rows, context = encode_documents(tokenizer, PAIRS * 40, 24, "=")
    net = RecordingNet(tokenizer.vocab_size)
    gen = torch.Generator().manual_seed(0)
    losses = [mdlm_loss(net, rows, context, gen).item() for _ in range(20)]
    noisy = torch.stack(net.seen)
    position = torch.arange(rows.shape[1])
    prompt = position[None, :] < context[:, None]
    assert not (noisy[:, prompt] == MASK_ID).any(), "a prompt token was masked"
    assert (noisy[:, ~prompt] == MASK_ID).float().mean() > 0.3, "answers must be masked at rate t ~ U(0, 1)"
    # Uniform logits cost log V per masked token; averaged over answer positions with the 1/t weight, ~log V.
    mean = sum(losses) / len(losses)
    assert abs(mean / math.log(tokenizer.vocab_size) - 1) < 0.15, mean


def test_random_cut_never_cuts_a_document():
    batch = torch.full((3, 20), PAD_ID)
    batch[0, :7], batch[1, :12], batch[2, :4] = 5, 6, 7
    gen = torch.Generator().manual_seed(0)
    cuts = [random_cut(batch, gen) for _ in range(300)]
    assert min(cuts) == 12 and max(cuts) == 20 and len(set(cuts)) == 9
    assert random_cut(torch.full((2, 5), 9), gen) == 5


def test_pretrain_with_prompts_through_the_cli(tmp_path, capsys):
    from jointdlm.cli import main

    corpus = tmp_path / "tasks.txt"
    write_corpus("tasks", corpus, num=300, seed=0)
    out = tmp_path / "m"
    code = main(["pretrain", "--corpus", str(corpus), "--out", str(out), "--preset", "tiny", "--max-steps", "4",
                 "--vocab-size", "300", "--seq-len", "24", "--prompt-separator", "=", "--random-canvas"])
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((out / CONFIG_FILE).read_text())["pretrain"]
    assert recorded["prompt_separator"] == "=" and recorded["random_canvas"] is True

    bad = tmp_path / "bad.txt"
    bad.write_text("copy : ann bob = ann bob\nno separator here\n")
    code = main(["pretrain", "--corpus", str(bad), "--out", str(tmp_path / "bad"), "--preset", "tiny",
                 "--max-steps", "2", "--vocab-size", "300", "--prompt-separator", "="])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no prompt separator" in err[-1]
    assert not (tmp_path / "bad").exists(), "a rejected corpus must leave nothing behind"
    code = main(["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "short"), "--preset", "tiny",
                 "--max-steps", "2", "--vocab-size", "300", "--seq-len", "4", "--prompt-separator", "="])
    assert code == 2 and "fills the whole canvas" in capsys.readouterr().err
    assert not (tmp_path / "short").exists()
