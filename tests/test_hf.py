"""The Hugging Face adapter on a tiny random Llama (bidirectional via `is_causal=False`) and our own BPE tokenizer.

Real LLaDA / Dream weights and their remote code cannot be fetched here; families are exercised through
custom `HFFamily` values with the tiny vocabulary's ids, and the real families through the same checkpoint
(its tokenizer declares its own mask id, which wins over the family's known one, with a warning).
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers

from jointdlm import cli
from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
from jointdlm.models.hf import (
    FAMILIES,
    HFDiffusionModel,
    HFFamily,
    detect_family,
    hf_fingerprint,
    load_hf_model,
    resolve_spec,
)
from jointdlm.models.loading import load_model
from jointdlm.models.protocol import DiffusionLM
from jointdlm.models.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, BPETokenizer
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_sampler

LINES = ["the cat sat on the mat", "a dog ran to the park", "birds sing in the morning"] * 20
PLAIN = HFFamily(name="tiny-plain", default_repo=None, mask_id=MASK_ID, shifted_logits=False, mask_style="2d",
                 position_ids=True)
SHIFTED = HFFamily(name="tiny-shifted", default_repo=None, mask_id=MASK_ID, shifted_logits=True, mask_style="4d",
                   position_ids=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_tiny")
    BPETokenizer.train(LINES, vocab_size=300).save(root)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="<pad>",
                                               bos_token="<bos>", eos_token="<eos>", mask_token="<mask>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                      is_causal=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                                      eos_token_id=EOS_ID)
    model_dir = root / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def plain(tiny_dir) -> HFDiffusionModel:
    return load_hf_model(tiny_dir, PLAIN)


@pytest.fixture(scope="module")
def shifted(tiny_dir) -> HFDiffusionModel:
    return load_hf_model(tiny_dir, SHIFTED)


def canvas(model: HFDiffusionModel, text: str = "the cat", masks: int = 5) -> torch.Tensor:
    return torch.tensor([[model.spec.bos_id, *model.tokenizer.encode(text), *[model.spec.mask_id] * masks]])


def raw(model: HFDiffusionModel, tokens: torch.Tensor):
    return model.model(input_ids=tokens, output_hidden_states=True)


@torch.no_grad()
def test_unshifted_family_passes_logits_through(plain):
    assert isinstance(plain, DiffusionLM)
    assert plain.spec.mask_id == MASK_ID and plain.spec.eos_id == EOS_ID and plain.spec.bos_id == BOS_ID
    tokens = canvas(plain)
    out, ref = plain.forward(tokens), raw(plain, tokens)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.hidden, ref.hidden_states[-1])


@torch.no_grad()
def test_shifted_family_realigns_logits_and_hidden(shifted):
    tokens = canvas(shifted)
    out, ref = shifted.forward(tokens), raw(shifted, tokens)
    assert torch.equal(out.logits[:, 1:], ref.logits[:, :-1])
    assert torch.equal(out.hidden[:, 1:], ref.hidden_states[-1][:, :-1])
    assert torch.equal(out.logits[:, 0], ref.logits[:, 0])
    with pytest.raises(ValueError, match="never a mask"):
        shifted.forward(torch.full((1, 4), MASK_ID))


@torch.no_grad()
@pytest.mark.parametrize("name", ["plain", "shifted"])
def test_lm_head_of_hidden_gives_logits(name, request):
    model = request.getfixturevalue(name)
    out = model.forward(canvas(model))
    torch.testing.assert_close(model.lm_head(out.hidden), out.logits)
    assert model.embed(canvas(model)).shape == out.hidden.shape
    at = canvas(model) == model.spec.mask_id
    torch.testing.assert_close(model.forward(canvas(model), at=at).logits, out.logits[at])


@torch.no_grad()
@pytest.mark.parametrize("name", ["plain", "shifted"])
def test_left_padding_leaves_real_tokens_unchanged(name, request):
    if name == "shifted" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("before transformers 5 the Llama stand-in ignores is_causal=False (causal alone, not with a "
                    "4-D mask)")
    model = request.getfixturevalue(name)
    tokens = canvas(model)
    padded = torch.cat([torch.full((1, 3), PAD_ID), tokens], dim=1)
    attention = (torch.arange(padded.shape[1]) >= 3).long()[None]
    alone, batched = model.forward(tokens), model.forward(padded, attention)
    torch.testing.assert_close(batched.logits[:, 4:], alone.logits[:, 1:])
    torch.testing.assert_close(batched.hidden[:, 4:], alone.hidden[:, 1:])


def test_kwargs_per_mask_style(shifted):
    tokens = canvas(shifted)
    attention = torch.ones_like(tokens)
    attention[0, 0] = 0
    assert "attention_mask" not in shifted._inputs(tokens, torch.ones_like(tokens))
    four = shifted._inputs(tokens, attention)
    assert four["attention_mask"].shape == (1, 1, tokens.shape[1], tokens.shape[1])
    assert four["position_ids"][0, 1:].tolist() == list(range(tokens.shape[1] - 1))
    llada_like = HFDiffusionModel(shifted.model, shifted.tokenizer, replace(FAMILIES["llada"], mask_id=MASK_ID))
    bias = llada_like._inputs(tokens, attention)
    assert bias["attention_bias"].dtype == torch.bool and "position_ids" not in bias


def test_parallel_generation(shifted):
    gen = generate(shifted, make_sampler("parallel"), SamplingConfig(length=8, tokens_per_step=2), num=3)
    assert gen.counters.base_passes == 4
    assert all(len(t) == 8 and MASK_ID not in t and BOS_ID not in t for t in gen.tokens)
    assert all(isinstance(text, str) for text in gen.texts)


@pytest.mark.parametrize("name", ["plain", "shifted"])
def test_untrained_adjust_head_equals_parallel(name, request):
    model = request.getfixturevalue(name)
    config = AdjustHeadConfig.for_base(model)
    assert (config.d_model, config.n_heads, config.mlp_hidden, config.rope_theta) == (32, 4, 64, 10000.0)
    head = AdjustHead(config).eval()
    cfg = SamplingConfig(length=8, tokens_per_step=4, seed=3)
    adjust = generate(model, make_sampler("adjust", head=head), cfg, prompts=["the cat", "a"])
    parallel = generate(model, make_sampler("parallel"), cfg, prompts=["the cat", "a"])
    assert adjust.tokens == parallel.tokens
    assert adjust.counters.extra_passes == 2 * 3


def test_bfloat16_base_with_float32_head(tiny_dir):
    model = load_hf_model(tiny_dir, SHIFTED, dtype="bfloat16")
    assert model.model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model.forward(canvas(model))
    assert out.hidden.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    head = AdjustHead(AdjustHeadConfig.for_base(model)).eval()
    gen = generate(model, make_sampler("adjust", head=head), SamplingConfig(length=4, tokens_per_step=2), num=2)
    assert all(MASK_ID not in t for t in gen.tokens)


def test_load_model_with_family_round_trip(tiny_dir, shifted):
    with pytest.warns(UserWarning, match="mask id is 151666"):
        model = load_model(tiny_dir, family="dream")
    assert isinstance(model, HFDiffusionModel)
    assert model.spec.shifted_logits and model.spec.mask_id == MASK_ID and model.max_length == 64
    tokens = canvas(model)
    with torch.no_grad():
        torch.testing.assert_close(model.forward(tokens).logits, shifted.forward(tokens).logits)
    with pytest.raises(ValueError, match="pass family="):
        load_model(tiny_dir)



def test_cli_family_flag_samples_a_hf_checkpoint(tiny_dir, tmp_path, capsys):
    from jointdlm.cli import main

    out = tmp_path / "s.jsonl"
    argv = ["sample", "--model", str(tiny_dir), "--sampler", "parallel", "--tokens-per-step", "2", "--num", "2",
            "--length", "4", "--out", str(out)]
    assert main(argv) == 2 and "pass family=" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="mask id"):
        assert main([*argv, "--family", "dream"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["tokens"]) == 4 and MASK_ID not in r["tokens"] for r in rows)
    assert main([*argv, "--family", "gpt"]) == 2 and "unknown model family" in capsys.readouterr().err


REMOTE_CONFIG = """from transformers import LlamaConfig


class TinyDreamConfig(LlamaConfig):
    model_type = "Dream"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tinydream import TinyDreamConfig


class DreamModel(LlamaForCausalLM):
    config_class = TinyDreamConfig
"""


@pytest.fixture(scope="module")
def remote_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint dressed as Dream ships: remote code registered for AutoModel only."""
    target = tmp_path_factory.mktemp("remote") / "tinydream"
    shutil.copytree(tiny_dir, target)
    (target / "configuration_tinydream.py").write_text(REMOTE_CONFIG)
    (target / "modeling_tinydream.py").write_text(REMOTE_MODEL)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="Dream", architectures=["DreamModel"],
                  auto_map={"AutoConfig": "configuration_tinydream.TinyDreamConfig",
                            "AutoModel": "modeling_tinydream.DreamModel"})
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_remote_code_runs_only_when_trusted(remote_dir, tmp_path, capsys):
    """A checkpoint's own Python is never imported without the opt-in; the error names the flag and the files."""
    marked = tmp_path / "marked"
    shutil.copytree(remote_dir, marked)
    marker = tmp_path / "imported.txt"
    (marked / "modeling_tinydream.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n" + REMOTE_MODEL)
    with pytest.raises(ValueError, match=r"ships its own Python code \(configuration_tinydream.py, "
                                         r"modeling_tinydream.py\).*--trust-remote-code"):
        load_model(marked)
    with pytest.raises(ValueError, match="trust-remote-code"):
        load_model(marked, family="dream")
    code = cli.main(["sample", "--model", str(marked), "--sampler", "parallel", "--num", "1",
                     "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--trust-remote-code" in err
    assert not marker.exists() and not (tmp_path / "o.jsonl").exists()
    with pytest.warns(UserWarning, match="mask id is 151666"):
        load_model(marked, trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_tokenizer_code_also_needs_the_opt_in(tiny_dir, tmp_path):
    """A tokenizer can ship its own Python (tokenizer_config.json's auto_map, as Dream's does): same opt-in."""
    marked = tmp_path / "tok_code"
    shutil.copytree(tiny_dir, marked)
    marker = tmp_path / "imported.txt"
    (marked / "tokenization_tiny.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast\n\n\n"
        "class TinyTokenizer(PreTrainedTokenizerFast):  # its own class: loading registers it for the Auto class\n"
        "    pass\n")
    settings = json.loads((marked / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizer"]}
    (marked / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"ships its own Python code \(tokenization_tiny.py\).*--trust-remote-code"):
        load_model(marked, family="dream")
    assert not marker.exists()
    with pytest.warns(UserWarning, match="mask id is 151666"):
        model = load_model(marked, family="dream", trust_remote_code=True)
    assert marker.read_text() == "ran" and model.tokenizer.encode("the cat")


def test_load_model_detects_remote_code_family(remote_dir, shifted):
    with pytest.warns(UserWarning, match="mask id is 151666"):
        model = load_model(remote_dir, trust_remote_code=True)
    assert type(model.model).__name__ == "DreamModel" and model.family is FAMILIES["dream"]
    tokens = canvas(model)
    with torch.no_grad():
        assert torch.equal(model.forward(tokens).logits, shifted.forward(tokens).logits)
    assert model.fingerprint() != shifted.fingerprint()


def test_detect_family():
    assert detect_family({"model_type": "llada", "architectures": ["LLaDAModelLM"]}) == "llada"
    assert detect_family({"model_type": "Dream", "architectures": ["DreamModel"]}) == "dream"
    assert detect_family({"architectures": ["DreamModel"]}) == "dream"
    assert detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) is None
    # LLaDA-MoE's config.json says model_type "llada": its architecture decides, whatever the families' order.
    assert detect_family({"model_type": "llada", "architectures": ["LLaDAMoEModelLM"]}) == "lladamoe"
    assert detect_family({"model_type": "llada"}) == "llada"


def word_tokenizer(words: list[str]) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=words[0])


def test_an_undeclared_mask_id_comes_from_the_vocabulary_or_is_refused():
    """LLaDA-MoE declares its mask id nowhere; falling back to a family's number could name an ordinary word."""
    config = SimpleNamespace(eos_token_id=0, pad_token_id=0, bos_token_id=0)
    moe = FAMILIES["lladamoe"]
    words = ["<eos>", "the", "cat", "<|mask|>", "sat"]
    assert resolve_spec(moe, word_tokenizer(words), config, len(words)).mask_id == 3
    llada_like = replace(FAMILIES["llada"], mask_id=4)
    with pytest.raises(ValueError, match="at the llada family's mask id 4 its tokenizer holds 'sat'"):
        resolve_spec(llada_like, word_tokenizer(["<eos>", "the", "cat", "dog", "sat"]), config, 5)
    with pytest.raises(ValueError, match="declares no mask id .* holds nothing: add \"mask_token_id\""):
        resolve_spec(moe, word_tokenizer(["<eos>", "the", "cat"]), config, 3)
    at_known = replace(FAMILIES["llada"], mask_id=2)  # a mask token where the family expects it: taken
    assert resolve_spec(at_known, word_tokenizer(["<eos>", "the", "<mask_0>"]), config, 3).mask_id == 2
    # ... before any other mask token the tokenizer holds
    assert resolve_spec(at_known, word_tokenizer(["<eos>", "<mask>", "<|mask|>"]), config, 3).mask_id == 2
    # A declared id always wins, with a warning.
    declared = SimpleNamespace(eos_token_id=0, pad_token_id=0, bos_token_id=0, mask_token_id=1)
    with pytest.warns(UserWarning, match="lladamoe family's mask id is 156895"):
        assert resolve_spec(moe, word_tokenizer(words), declared, len(words)).mask_id == 1


def test_fingerprint_stable_and_weight_sensitive(tiny_dir, plain):
    again = load_hf_model(tiny_dir, PLAIN, check=False)
    assert again.fingerprint() == plain.fingerprint()
    assert load_hf_model(tiny_dir, SHIFTED, check=False).fingerprint() != plain.fingerprint()
    state = {k: v.clone() for k, v in again.model.state_dict().items()}
    sampled = hf_fingerprint({}, state, full_hash_elements=0)
    assert sampled != hf_fingerprint({}, state)
    with torch.no_grad():
        again.model.get_input_embeddings().weight[7, 0] += 1.0
    again._fingerprint = None
    assert again.fingerprint() != plain.fingerprint()
    state["model.embed_tokens.weight"].view(-1)[0] += 1.0
    assert hf_fingerprint({}, state, full_hash_elements=0) != sampled


def test_tokenizer_wrapper(plain):
    ids = plain.tokenizer.encode("the cat <mask> sat")
    assert MASK_ID not in ids and min(ids) > MASK_ID
    assert plain.tokenizer.decode([BOS_ID, *ids, MASK_ID, EOS_ID, PAD_ID]) == "the cat <mask> sat"


def test_clear_errors(tmp_path, tiny_dir, plain):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(OSError, match="could not load model weights"):
        load_hf_model(no_weights, PLAIN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_model(tmp_path / "missing", "llada")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing", family="dream")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_model(tmp_path, "dream")
    with pytest.raises(ValueError, match="unknown model family"):
        load_hf_model(tmp_path, "gpt")
    with pytest.raises(ValueError, match="no output embedding"):
        HFDiffusionModel(plain.model.model, plain.tokenizer.hf, PLAIN)


CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<bos>assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with a chat template saved in its tokenizer files, as instruct checkpoints ship it."""
    target = tmp_path_factory.mktemp("hf_chat") / "model"
    shutil.copytree(tiny_dir, target)
    tok = transformers.AutoTokenizer.from_pretrained(target)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def chat_model(chat_dir) -> HFDiffusionModel:
    with pytest.warns(UserWarning, match="mask id"):
        return load_model(chat_dir, family="llada")


def test_chat_prompts_are_the_checkpoints_own_template(chat_model, tiny_model_dir):
    """--chat: each prompt is a user turn in the tokenizer's template, its special tokens parsed, ids as the
    checkpoint's own `apply_chat_template` gives them (no second BOS); plain prompts keep special-token text as
    text; a prompt that would bring in the mask id, and a model without a template, are refused."""
    from jointdlm.sampling.loop import encode_prompts

    hf_tok = chat_model.tokenizer.hf
    own = hf_tok.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True,
                                     tokenize=True)
    own = list(own["input_ids"] if isinstance(own, dict) or hasattr(own, "keys") else own)
    chat = encode_prompts(chat_model, ["the cat"], chat=True)[0]
    assert chat == own and chat[0] == BOS_ID and chat.count(BOS_ID) == 2 and EOS_ID in chat
    plain_ids = encode_prompts(chat_model, ["<eos> the cat"])[0]
    assert EOS_ID not in plain_ids and plain_ids[0] == BOS_ID
    with pytest.raises(ValueError, match="contains the mask token"):
        encode_prompts(chat_model, ["the <mask> sat"], chat=True)
    config = SamplingConfig(length=4, tokens_per_step=2, chat=True)
    gen = generate(chat_model, make_sampler("parallel"), config, prompts=["the cat", "a dog ran"])
    assert all(len(t) == 4 and MASK_ID not in t for t in gen.tokens) and gen.prompts == ["the cat", "a dog ran"]
    with pytest.raises(ValueError, match="give prompts"):
        generate(chat_model, make_sampler("parallel"), config, num=2)
    builtin = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="no chat template|has none"):
        encode_prompts(builtin, ["the cat"], chat=True)


@pytest.mark.filterwarnings("ignore:the llada family's mask id")
def test_text_ends_at_the_templates_end_of_turn(chat_model):
    """An instruct model closes its answer with the template's end-of-turn token (LLaDA-Instruct's <|eot_id|>,
    Qwen's <|im_end|>); decoding drops special tokens, so without a cut there what follows would be glued onto
    the answer. Here a template whose turns close with <pad> (the tiny vocabulary has no spare special token)."""
    hf_tok = chat_model.tokenizer.hf
    assert chat_model.tokenizer.end_of_turn_ids() == [EOS_ID]  # the fixture's template closes turns with <eos>
    tok = transformers.AutoTokenizer.from_pretrained(chat_model.tokenizer.hf.name_or_path)
    tok.chat_template = CHAT_TEMPLATE.replace("}}<eos>", "}}<pad>")
    model = HFDiffusionModel(chat_model.model, tok, chat_model.family)
    assert model.tokenizer.end_of_turn_ids() == [PAD_ID]
    words = model.tokenizer.encode("the cat sat")
    init = torch.tensor([[words[0], words[1], PAD_ID, words[2]]])
    gen = generate(model, make_sampler("parallel"), SamplingConfig(length=4, progress=False), num=1, init=init)
    assert gen.tokens[0] == init[0].tolist()
    assert gen.texts[0] == hf_tok.decode(words[:2]) != hf_tok.decode(words)
    # generation_config.json's eos_token_id (an id or a list, as transformers' generate reads it) ends text too
    generation = Path(chat_model.tokenizer.hf.name_or_path) / "generation_config.json"
    saved = generation.read_text()  # as transformers saved it: the model config's EOS
    assert load_model(generation.parent, family="llada").generation_stops == (EOS_ID,)
    generation.write_text(json.dumps({"eos_token_id": [EOS_ID, words[1], 10**9]}))
    try:
        stopping = load_model(generation.parent, family="llada")
    finally:
        generation.write_text(saved)
    assert stopping.generation_stops == tuple(sorted((EOS_ID, words[1])))
    gen = generate(stopping, make_sampler("parallel"), SamplingConfig(length=4, progress=False), num=1, init=init)
    assert gen.texts[0] == hf_tok.decode(words[:1])
    plain = transformers.AutoTokenizer.from_pretrained(chat_model.tokenizer.hf.name_or_path)
    plain.chat_template = None
    assert HFDiffusionModel(chat_model.model, plain, chat_model.family).tokenizer.end_of_turn_ids() == []


def test_chat_trajectories_keep_the_template(chat_model, tmp_path):
    """Trajectories for an instruct head hold the templated prefix, and the flag is part of the data's identity."""
    from jointdlm.adjust.trajectories import TrajectoryConfig, collect_trajectories, load_trajectories
    from jointdlm.sampling.loop import encode_prompts

    cfg = TrajectoryConfig(num=4, length=4, shard_size=4, batch_size=4, progress=False, chat=True)
    collect_trajectories(chat_model, tmp_path / "t", cfg, prompts=["the cat", "a dog"])
    data = load_trajectories(tmp_path / "t")
    want = encode_prompts(chat_model, ["the cat"], chat=True)[0]
    assert data.config.chat and data.prefix[0, -len(want):].tolist() == want
    with pytest.raises(ValueError, match="collected differently .*chat=True there, False asked for"):
        collect_trajectories(chat_model, tmp_path / "t", TrajectoryConfig(num=4, length=4, shard_size=4,
                                                                          batch_size=4, progress=False),
                             prompts=["the cat", "a dog"])


def test_lm_eval_apply_chat_template(chat_dir, tiny_dir):
    """lm-eval --apply_chat_template: the model formats the turns with the checkpoint's template, and the contexts
    it gets back are encoded with their special tokens parsed."""
    pytest.importorskip("lm_eval")
    from jointdlm.eval.harness import register

    lm_class = register()
    with pytest.warns(UserWarning, match="mask id"):
        base = lm_class(pretrained=str(tiny_dir), family="llada")
    with pytest.raises(ValueError, match="needs a checkpoint whose tokenizer has a chat template"):
        base.apply_chat_template([{"role": "user", "content": "the cat"}])
    with pytest.warns(UserWarning, match="mask id"):
        lm = lm_class(pretrained=str(chat_dir), family="llada", sampler="parallel", tokens_per_step=2,
                      max_gen_toks=4)
    context = lm.apply_chat_template([{"role": "user", "content": "the cat"}])
    assert lm.templated and context.startswith("<bos>user: the cat<eos>") and lm.chat_template(True) == CHAT_TEMPLATE
    assert lm._prefixes([context])[0] == encode_prompts_chat(lm.model, "the cat")
    assert lm.tokenizer_name
    out = lm.generate_until([SimpleNamespace(args=(context, {"until": ["zzz"], "max_gen_toks": 4}))])
    assert len(out) == 1 and isinstance(out[0], str)


def encode_prompts_chat(model: HFDiffusionModel, text: str) -> list[int]:
    from jointdlm.sampling.loop import encode_prompts

    return encode_prompts(model, [text], chat=True)[0]


def test_cli_chat_flag_errors_are_one_line(tiny_dir, tiny_model_dir, chat_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n")
    base = ["sample", "--sampler", "parallel", "--tokens-per-step", "2", "--length", "4", "--chat",
            "--out", str(tmp_path / "o.jsonl")]
    with pytest.warns(UserWarning, match="mask id"):
        assert cli.main([*base, "--model", str(tiny_dir), "--family", "llada"]) == 2
    assert "give --prompts" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="mask id"):
        assert cli.main([*base, "--model", str(tiny_dir), "--family", "llada", "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err  # transformers' own weight-loading bar comes first
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("no chat template (a base model?): "
                                                                            "leave out --chat")
    assert cli.main([*base, "--model", str(tiny_model_dir), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat template" in err and not (tmp_path / "o.jsonl").exists()
    with pytest.warns(UserWarning, match="mask id"):
        assert cli.main([*base, "--model", str(chat_dir), "--family", "llada", "--prompts", str(prompts)]) == 0
    row = json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == "the cat" and len(row["tokens"]) == 4


def test_code_that_returns_no_hidden_states(tiny_dir, plain):
    """Some released code (RND1-style) drops output_hidden_states, or hands back a bare tuple: the LM head's input
    is the last hidden state."""
    from transformers.modeling_outputs import MaskedLMOutput

    class NoHiddenStates(transformers.LlamaForCausalLM):
        def forward(self, **kwargs):
            return MaskedLMOutput(logits=super().forward(**kwargs).logits)

    class TupleOnly(transformers.LlamaForCausalLM):  # ignores return_dict: a bare (logits,) tuple
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None,
                    output_hidden_states=None):
            return (super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=use_cache).logits,)

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    for code in (NoHiddenStates, TupleOnly):
        model = HFDiffusionModel(code.from_pretrained(tiny_dir).eval(), tokenizer, PLAIN)
        model.self_check()
        model.check_head()
        tokens = canvas(model)
        with torch.no_grad():
            ours, reference = model.forward(tokens), plain.forward(tokens)
        assert torch.equal(ours.logits, reference.logits) and torch.equal(ours.hidden, reference.hidden)
