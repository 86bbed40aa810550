"""Checkpoints that ship their own code, loaded exactly as the released LLaDA-8B, LLaDA-MoE, Dream-7B and RND1 load.

tests/remote_code holds tiny stand-ins written for these tests that reproduce the released files' quirks (see its
README): LLaDA-style code never calls `post_init`, takes no arguments in `tie_weights` and ignores padding;
Dream-style code asks transformers for a "default" rotary init and leaves its rotary buffer unfilled
under transformers 5, and swallows unknown keyword arguments; LLaDA-MoE-style code says model_type
"llada", declares no mask id, keeps transformers 4's rotary module with nothing to refill it, routes tokens to
experts and takes no keyword it does not list; RND1-style code builds transformers 5's Qwen3 rotary module
from a config whose `rope_scaling` is False, has no BOS token, shifts its logits, adds its attention mask to the
scores and keeps its LM under `AutoModelForMaskedLM`. The checkpoints are written here (code,
config with `auto_map`, safetensors weights, tokenizer) and go through `trust_remote_code=True`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from jointdlm import cli
from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
from jointdlm.models import hf
from jointdlm.models.causal import CausalScorer
from jointdlm.models.hf import load_hf_model
from jointdlm.models.loading import load_model
from jointdlm.models.mdlm import BuiltinModel, MaskedDiffusionTransformer, MDLMConfig
from jointdlm.models.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, BPETokenizer
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_sampler

pytestmark = [pytest.mark.filterwarnings("ignore:the (llada|lladamoe|dream|rnd1) family's mask id"),
              pytest.mark.filterwarnings("ignore:.*ignores padding"),
              pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated")]

CODE = Path(__file__).parent / "remote_code"
MODULES = {"rnd1": "rnd"}  # a kind whose files are not named after it
LINES = ["the cat sat on the mat", "a dog ran to the park", "birds sing in the morning"] * 20
PROMPTS = ["the cat", "a", "birds sing in the", "", "the dog ran", "a cat", "the", "sing in"]
D, HEADS, LAYERS, MLP, LENGTH, EXPERTS = 32, 4, 2, 64, 64, 4
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# RND1's code imports transformers' Qwen3-MoE modules (transformers >= 4.51): not in the oldest version we support.
QWEN3_MOE = importlib.util.find_spec("transformers.models.qwen3_moe") is not None
KINDS = ("llada", "lladamoe", "dream") + (("rnd1",) if QWEN3_MOE else ())


def tokenizer_files(root: Path, declare_mask: bool = True, declare_bos: bool = True
                    ) -> transformers.PreTrainedTokenizerFast:
    """Our BPE tokenizer as a transformers one; with `declare_mask=False` its "<mask>" token is in the vocabulary
    but not declared as the mask token (as LLaDA-MoE's tokenizer and config declare none); with
    `declare_bos=False` it declares no BOS (as Qwen's tokenizers, RND1's)."""
    root.mkdir(parents=True, exist_ok=True)
    BPETokenizer.train(LINES, vocab_size=300).save(root)
    special = {"mask_token": "<mask>"} if declare_mask else {}
    if declare_bos:
        special["bos_token"] = "<bos>"
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="<pad>",
                                                eos_token="<eos>", **special)


def linear(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5


def llada_weights(vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"model.wte.weight": torch.randn(vocab, D, generator=gen), "model.ln_f.weight": torch.ones(D),
             "model.ff_out.weight": linear(vocab, D, gen)}
    for i in range(LAYERS):
        block = f"model.blocks.{i}."
        state.update({block + "attn_norm.weight": torch.ones(D), block + "ff_norm.weight": torch.ones(D),
                      block + "q_proj.weight": linear(D, D, gen), block + "k_proj.weight": linear(D, D, gen),
                      block + "v_proj.weight": linear(D, D, gen), block + "attn_out.weight": linear(D, D, gen),
                      block + "ff_proj.weight": linear(MLP, D, gen), block + "up_proj.weight": linear(MLP, D, gen),
                      block + "ff_out.weight": linear(D, MLP, gen)})
    return state


def llama_frame(vocab: int, gen: torch.Generator, layer: Callable[[str], dict[str, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
    """Weights laid out as Dream and LLaDA-MoE name them: embedding, final norm, LM head, and per layer its two
    norms plus what `layer(prefix)` adds."""
    state = {"model.embed_tokens.weight": torch.randn(vocab, D, generator=gen), "model.norm.weight": torch.ones(D),
             "lm_head.weight": linear(vocab, D, gen)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        state.update({prefix + "input_layernorm.weight": torch.ones(D),
                      prefix + "post_attention_layernorm.weight": torch.ones(D), **layer(prefix)})
    return state


def dream_weights(vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def layer(prefix: str) -> dict[str, torch.Tensor]:
        state = {prefix + "self_attn.o_proj.weight": linear(D, D, gen),
                 prefix + "gate_proj.weight": linear(MLP, D, gen), prefix + "up_proj.weight": linear(MLP, D, gen),
                 prefix + "down_proj.weight": linear(D, MLP, gen)}
        for name in ("q_proj", "k_proj", "v_proj"):
            state[prefix + f"self_attn.{name}.weight"] = linear(D, D, gen)
            state[prefix + f"self_attn.{name}.bias"] = 0.1 * torch.randn(D, generator=gen)
        return state

    return llama_frame(vocab, gen, layer)


def expert_weights(prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One MoE layer's experts, as LLaDA-MoE and RND1 name them (their router, `mlp.gate`, stays with the layer)."""
    state = {}
    for e in range(EXPERTS):
        expert = prefix + f"mlp.experts.{e}."
        state.update({expert + "gate_proj.weight": linear(MLP // 2, D, gen),
                      expert + "up_proj.weight": linear(MLP // 2, D, gen),
                      expert + "down_proj.weight": linear(D, MLP // 2, gen)})
    return state


def lladamoe_weights(vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def layer(prefix: str) -> dict[str, torch.Tensor]:
        state = {prefix + "self_attn.q_norm.weight": torch.ones(D // HEADS),
                 prefix + "self_attn.k_norm.weight": torch.ones(D // HEADS),
                 prefix + "mlp.gate.weight": linear(EXPERTS, D, gen)}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[prefix + f"self_attn.{name}.weight"] = linear(D, D, gen)
        return {**state, **expert_weights(prefix, gen)}

    return llama_frame(vocab, gen, layer)


RND1_HEAD, RND1_KV = D // HEADS, 2


def rnd1_weights(vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def layer(prefix: str) -> dict[str, torch.Tensor]:
        state = {prefix + "self_attn.q_proj.weight": linear(D, D, gen),
                 prefix + "self_attn.k_proj.weight": linear(RND1_KV * RND1_HEAD, D, gen),
                 prefix + "self_attn.v_proj.weight": linear(RND1_KV * RND1_HEAD, D, gen),
                 prefix + "self_attn.o_proj.weight": linear(D, D, gen),
                 prefix + "self_attn.q_norm.weight": torch.ones(RND1_HEAD),
                 prefix + "self_attn.k_norm.weight": torch.ones(RND1_HEAD),
                 prefix + "mlp.gate.weight": linear(EXPERTS, D, gen)}
        return {**state, **expert_weights(prefix, gen)}

    return llama_frame(vocab, gen, layer)


def write_checkpoint(kind: str, target: Path, seed: int = 0, code_note: str | None = None) -> Path:
    """A `kind` (one of KINDS) checkpoint as released: code files, config.json with auto_map, weights, tokenizer.
    `code_note` appends a line to the modeling file (another checkpoint's code, same file names)."""
    target.mkdir(parents=True)
    tokenizer = tokenizer_files(target.parent / f"{target.name}_tokenizer", declare_mask=kind != "lladamoe",
                                declare_bos=kind != "rnd1")
    tokenizer.save_pretrained(target)
    vocab = len(tokenizer)
    for source in (CODE / kind).glob("*.py"):
        shutil.copy(source, target / source.name)
    if code_note is not None:
        with open(target / f"modeling_{MODULES.get(kind, kind)}.py", "a") as f:
            f.write(f"\nCODE_NOTE = {code_note!r}\n")
    ids = {"mask_token_id": MASK_ID, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    gen = torch.Generator().manual_seed(seed)
    if kind == "llada":
        config = {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": D, "n_heads": HEADS,
                  "n_layers": LAYERS, "mlp_hidden_size": MLP, "vocab_size": vocab, "max_sequence_length": LENGTH,
                  "rope_theta": 10000.0, "weight_tying": False, "use_cache": False,
                  "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                               "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                               "AutoModel": "modeling_llada.LLaDAModelLM"}}
        state = llada_weights(vocab, gen)
    elif kind == "lladamoe":  # model_type "llada" like the dense model; config.json declares no mask id
        config = {"model_type": "llada", "architectures": ["LLaDAMoEModelLM"], "hidden_size": D,
                  "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "expert_intermediate_size": MLP // 2,
                  "num_experts": EXPERTS, "num_experts_per_tok": 2, "vocab_size": vocab,
                  "max_position_embeddings": LENGTH, "rope_theta": 50000.0, "tie_word_embeddings": False,
                  "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                               "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                               "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"}}
        ids.pop("mask_token_id")
        state = lladamoe_weights(vocab, gen)
    elif kind == "rnd1":  # as Qwen's config.json: BOS is <|endoftext|>, the pad token
        config = {"model_type": "rnd1", "architectures": ["RND1LM"], "hidden_size": D, "head_dim": RND1_HEAD,
                  "num_attention_heads": HEADS, "num_key_value_heads": RND1_KV, "num_hidden_layers": LAYERS,
                  "moe_intermediate_size": MLP // 2, "num_experts": EXPERTS, "num_experts_per_tok": 2,
                  "vocab_size": vocab, "max_position_embeddings": LENGTH, "tie_word_embeddings": False,
                  "auto_map": {"AutoConfig": "configuration_rnd.RND1Config", "AutoModel": "modeling_rnd.RND1Model",
                               "AutoModelForMaskedLM": "modeling_rnd.RND1LM"}}
        ids["bos_token_id"] = PAD_ID
        state = rnd1_weights(vocab, gen)
    else:
        config = {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": D,
                  "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": MLP,
                  "vocab_size": vocab, "max_position_embeddings": LENGTH, "rope_theta": 10000.0,
                  "rope_scaling": None, "tie_word_embeddings": False,
                  "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                               "AutoModel": "modeling_dream.DreamModel"}}
        state = dream_weights(vocab, gen)
    (target / "config.json").write_text(json.dumps({**config, **ids}, indent=2))
    if kind in ("dream", "rnd1"):  # both read it in their own from_pretrained
        (target / "generation_config.json").write_text(json.dumps({**ids, "steps": 512}, indent=2))
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote_checkpoints")
    return {kind: write_checkpoint(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def llada(checkpoints) -> hf.HFDiffusionModel:
    return load_model(checkpoints["llada"], trust_remote_code=True)


@pytest.fixture(scope="module")
def lladamoe(checkpoints) -> hf.HFDiffusionModel:
    return load_model(checkpoints["lladamoe"], trust_remote_code=True)


@pytest.fixture(scope="module")
def dream(checkpoints) -> hf.HFDiffusionModel:
    return load_model(checkpoints["dream"], trust_remote_code=True)


@pytest.fixture(scope="module")
def rnd1(checkpoints) -> hf.HFDiffusionModel:
    if "rnd1" not in checkpoints:
        pytest.skip(f"RND1's code needs transformers' Qwen3-MoE modules (>= 4.51), not {transformers.__version__}")
    return load_model(checkpoints["rnd1"], trust_remote_code=True)


def sample_argv(checkpoint: Path, prompts: Path, batch: int, out: Path) -> list[str]:
    return ["sample", "--model", str(checkpoint), "--trust-remote-code", "--sampler", "parallel", "--tokens-per-step",
            "2", "--length", "10", "--prompts", str(prompts), "--batch-size", str(batch), "--out", str(out)]


@pytest.fixture(scope="module")
def fresh_process(checkpoints, tmp_path_factory) -> tuple[dict[str, str], Path]:
    """One new process (one transformers import): each checkpoint loaded by transformers alone (no jointdlm shims;
    the error's type and first line), then sampled through the CLI at batch size 8."""
    root = tmp_path_factory.mktemp("fresh_process")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    lines = ["import json, transformers", "from jointdlm.cli import main", "errors = {}"]
    for kind in KINDS:
        if kind != "lladamoe":  # it loads, with an uninitialised rotary buffer (the self-check test below)
            lines += ["try:",
                      f"    transformers.AutoModel.from_pretrained({str(checkpoints[kind])!r}, trust_remote_code=True)",
                      "except Exception as err:",
                      f"    errors[{kind!r}] = type(err).__name__ + ' ' + (str(err).splitlines() or [''])[0]",
                      "else:",
                      f"    errors[{kind!r}] = 'loaded'"]
        lines.append(f"assert main({sample_argv(checkpoints[kind], prompts, 8, root / f'{kind}_8.jsonl')!r}) == 0")
    lines.append("print(json.dumps(errors))")
    run = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), root


@pytest.mark.skipif(not TRANSFORMERS_5, reason="the released code breaks only under transformers 5")
def test_released_style_code_does_not_load_with_transformers_alone(fresh_process):
    """The stand-ins fail the way the released files do, so the shims below are tested against the real faults."""
    errors, _ = fresh_process
    assert errors["llada"].startswith("AttributeError") and "all_tied_weights_keys" in errors["llada"]
    assert errors["dream"] == "KeyError 'default'"
    assert errors["rnd1"] == "TypeError 'bool' object is not subscriptable"  # rope_parameters is False


def test_every_family_loads_with_its_own_code(llada, lladamoe, dream):
    assert type(llada.model).__name__ == "LLaDAModelLM" and llada.family is hf.FAMILIES["llada"]
    assert type(dream.model).__name__ == "DreamModel" and dream.family is hf.FAMILIES["dream"]
    # model_type "llada" as for the dense model: the architecture tells them apart, and the mask id is the
    # tokenizer's "<mask>" although neither the tokenizer nor config.json declares it.
    assert type(lladamoe.model).__name__ == "LLaDAMoEModelLM" and lladamoe.family is hf.FAMILIES["lladamoe"]
    assert lladamoe.spec.mask_id == MASK_ID and lladamoe.config.to_dict().get("mask_token_id") is None
    assert not llada.spec.shifted_logits and not lladamoe.spec.shifted_logits and dream.spec.shifted_logits
    assert (llada.max_length, lladamoe.max_length, dream.max_length) == (LENGTH, LENGTH, LENGTH)
    assert llada.block_shape()[:3] == dream.block_shape()[:3] == (D, HEADS, MLP)
    for model, theta in ((dream, 10000.0), (lladamoe, 50000.0)):
        rotaries = [m for m in model.model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        assert rotaries
        for rotary in rotaries:
            expected = 1.0 / theta ** (torch.arange(0, D // HEADS, 2).float() / (D // HEADS))
            torch.testing.assert_close(rotary.inv_freq, expected)


def test_rnd1_loads_with_its_own_code(rnd1):
    """Its LM is the auto_map's AutoModelForMaskedLM (its AutoModel has no LM head); the rotary tables of
    transformers 5's Qwen3 module are filled although its config set `rope_scaling` False; with no BOS in the
    tokenizer, canvases start with the config's (Qwen's <|endoftext|>, the pad token), and logits are shifted."""
    assert type(rnd1.model).__name__ == "RND1LM" and rnd1.family is hf.FAMILIES["rnd1"]
    assert rnd1.tokenizer.hf.bos_token_id is None
    assert (rnd1.spec.bos_id, rnd1.spec.mask_id, rnd1.spec.shifted_logits) == (PAD_ID, MASK_ID, True)
    rotaries = [m for m in rnd1.model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    assert len(rotaries) == LAYERS + 1
    expected = 1.0 / 1e6 ** (torch.arange(0, RND1_HEAD, 2).float() / RND1_HEAD)
    for rotary in rotaries:
        torch.testing.assert_close(rotary.inv_freq, expected)
    gen = generate(rnd1, make_sampler("parallel"), SamplingConfig(length=6, tokens_per_step=2), prompts=["", "a"])
    assert all(len(row) == 6 and MASK_ID not in row for row in gen.tokens)  # the empty prompt too


def test_rnd1_padding_reaches_sdpa_and_eager_attention(rnd1):
    """RND1's attention hands the mask to SDPA, or adds it to the scores under eager attention: an additive mask
    is right for both (a boolean one would add 0/1 to the scores)."""
    assert rnd1.honours_padding
    tokens = torch.tensor([[PAD_ID, 200, 201, MASK_ID, MASK_ID]])
    padded = torch.cat([torch.full((1, 2), PAD_ID), tokens], dim=1)
    attention = torch.ones_like(padded)
    attention[:, :2] = 0
    config = rnd1.model.config
    implementation = config._attn_implementation
    try:
        for name in ("sdpa", "eager"):
            config._attn_implementation = name
            with torch.no_grad():
                alone = rnd1.forward(tokens).logits[:, 1:]
                batched = rnd1.forward(padded, attention).logits[:, 3:]
            torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    finally:
        config._attn_implementation = implementation


def test_loads_are_bit_identical(checkpoints, llada, lladamoe, dream):
    """A second load (fresh uninitialised memory for anything not in the checkpoint) computes the same logits."""
    loaded = {"llada": llada, "lladamoe": lladamoe, "dream": dream}
    if "rnd1" in checkpoints:
        loaded["rnd1"] = load_model(checkpoints["rnd1"], trust_remote_code=True)
    for kind, first in loaded.items():
        again = load_model(checkpoints[kind], trust_remote_code=True)
        tokens = torch.tensor([[BOS_ID, *first.tokenizer.encode("the cat"), MASK_ID, MASK_ID]])
        with torch.no_grad():
            assert torch.equal(again.forward(tokens).logits, first.forward(tokens).logits)


@pytest.mark.parametrize("kind", ["dream", "lladamoe", "rnd1"])
def test_an_unfilled_rotary_buffer_is_refused(kind, checkpoints, monkeypatch):
    """Without the refill, transformers 5 leaves Dream's, LLaDA-MoE's and RND1's inv_freq uninitialised (LLaDA-MoE
    then loads without an error): the self-check says so."""
    if not TRANSFORMERS_5:
        pytest.skip("transformers 4 computes the buffer at construction")
    if kind not in checkpoints:
        pytest.skip("RND1's code needs transformers' Qwen3-MoE modules")
    monkeypatch.setattr(hf, "_refill_rotary", lambda model: None)
    with pytest.raises(ValueError, match="rotary buffer .*inv_freq holds no rotary frequencies"):
        load_model(checkpoints[kind], trust_remote_code=True)


def test_self_check_finds_code_that_ignores_padding(checkpoints, llada, lladamoe, dream):
    assert not llada.honours_padding  # the released LLaDA attention never sees the mask
    assert not lladamoe.honours_padding  # LLaDA-MoE drops attention_mask
    assert dream.honours_padding  # Dream reads a 4-D boolean attention_mask
    wrong_kwarg = hf.HFFamily(name="dream", default_repo=None, mask_id=MASK_ID, shifted_logits=True,
                              mask_style="bias", auto_classes=("AutoModel",))
    with pytest.warns(UserWarning, match="ignores padding"):
        swallowed = load_hf_model(checkpoints["dream"], wrong_kwarg, trust_remote_code=True)
    assert not swallowed.honours_padding  # attention_bias= is swallowed by **kwargs: padding silently ignored


@pytest.mark.parametrize("kind", KINDS)
def test_prompts_of_unequal_length_do_not_depend_on_the_batch(kind, request):
    model = request.getfixturevalue(kind)

    def run(batch_size: int):
        config = SamplingConfig(length=10, tokens_per_step=2, batch_size=batch_size, seed=4)
        return generate(model, make_sampler("parallel"), config, prompts=PROMPTS)

    together, alone = run(8), run(1)
    assert together.tokens == alone.tokens
    assert together.batched_by_length == (kind not in ("dream", "rnd1"))
    if together.batched_by_length:  # the grouping is what keeps it invariant: padded batches change LLaDA-style samples
        model.honours_padding = True
        try:
            assert run(8).tokens != alone.tokens
        finally:
            model.honours_padding = False


def test_two_checkpoints_of_one_family_keep_their_own_code(tmp_path, llada):
    """Remote code registers itself by model_type on import; each checkpoint still gets the classes of its own
    files, not those of the first one loaded in the process."""
    other = load_model(write_checkpoint("llada", tmp_path / "other", seed=1, code_note="second"),
                       trust_remote_code=True)
    assert getattr(sys.modules[type(other.model).__module__], "CODE_NOTE", None) == "second"
    assert not hasattr(sys.modules[type(llada.model).__module__], "CODE_NOTE")


def test_code_that_fails_is_one_line(tmp_path, capsys):
    broken = write_checkpoint("dream", tmp_path / "broken")
    with open(broken / "modeling_dream.py", "a") as f:
        f.write("\nraise RuntimeError('this checkpoint needs a GPU')\n")
    code = cli.main(["sample", "--model", str(broken), "--trust-remote-code", "--sampler", "parallel", "--num", "1",
                     "--length", "4",
                     "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "RuntimeError: this checkpoint needs a GPU" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()
    missing = write_checkpoint("llada", tmp_path / "missing")
    state = llada_weights(len(transformers.AutoTokenizer.from_pretrained(missing)), torch.Generator().manual_seed(0))
    state.pop("model.ln_f.weight")
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 of the model's weights \\(model.ln_f.weight\\)"):
        load_model(missing, trust_remote_code=True)
    # Dream's own from_pretrained takes a model back from super(): the loading info must still reach the check.
    missing = write_checkpoint("dream", tmp_path / "missing_dream")
    state = dream_weights(len(transformers.AutoTokenizer.from_pretrained(missing)), torch.Generator().manual_seed(0))
    state.pop("model.norm.weight")
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 of the model's weights \\(model.norm.weight\\)"):
        load_model(missing, trust_remote_code=True)


def test_block_diffusion_checkpoints_are_refused(tmp_path, capsys):
    """LLaDA2.0's architecture name contains "llada": before this check it loaded as LLaDA and sampled over the
    whole canvas, which its block-causal training never saw (and with LLaDA's mask id unless its tokenizer
    declared one). Refused in one line, detected or forced, as are SDAR, BD3-LM and Fast-dLLM v2."""
    checkpoint = write_checkpoint("llada", tmp_path / "llada2")
    config = json.loads((checkpoint / "config.json").read_text())
    for model_type, architecture, name in (("llada2_moe", "LLaDA2MoeModelLM", "LLaDA2.x"),
                                           ("sdar", "SDARForCausalLM", "SDAR"), ("bd3lm", "BD3LM", "BD3-LM"),
                                           ("Fast_dLLM_Qwen", "Fast_dLLM_QwenForCausalLM", "Fast-dLLM v2")):
        (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": model_type,
                                                            "architectures": [architecture]}))
        for family in (None, "llada"):
            with pytest.raises(ValueError, match=f"is a {name} checkpoint, a block-diffusion model"):
                load_model(checkpoint, family=family, trust_remote_code=True)
    code = cli.main(["sample", "--model", str(checkpoint), "--trust-remote-code", "--sampler", "parallel", "--num", "1",
                     "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "block-diffusion" in err


def hub_cache(root: Path, repo_id: str, checkpoint: Path) -> Path:
    """A Hugging Face Hub cache holding `checkpoint` as the snapshot of `repo_id`, as a download leaves it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    return root


def test_a_hub_repo_id_loads_like_its_directory(checkpoints, tmp_path):
    """`--model org/name` (no such directory): the snapshot in the Hub cache (offline here) is loaded through the
    checkpoint's own classes and shims, family detected, remote code behind the opt-in. Before, a repo id went to
    transformers' Auto classes alone, which cannot build released LLaDA, Dream or RND1 under transformers 5."""
    cache = hub_cache(tmp_path / "hub", "example-org/dream-tiny", checkpoints["dream"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\na\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def sample(*extra: str, out: str = "o.jsonl") -> subprocess.CompletedProcess:
        argv = ["sample", "--model", "example-org/dream-tiny", "--sampler", "parallel", "--tokens-per-step", "2",
                "--length", "6", "--prompts", str(prompts), "--out", str(tmp_path / out), *extra]
        return subprocess.run([sys.executable, "-m", "jointdlm.cli", *argv], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)

    refused = sample()
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr and "Traceback" not in refused.stderr
    done = sample("--trust-remote-code")
    assert done.returncode == 0, done.stderr[-2000:]
    local = tmp_path / "local.jsonl"
    assert cli.main(["sample", "--model", str(checkpoints["dream"]), "--trust-remote-code", "--sampler", "parallel",
                     "--tokens-per-step", "2", "--length", "6", "--prompts", str(prompts), "--out", str(local)]) == 0
    assert samples(tmp_path / "o.jsonl") == samples(local)
    forced = sample("--trust-remote-code", "--family", "dream", out="forced.jsonl")
    missing_repo = subprocess.run([sys.executable, "-m", "jointdlm.cli", "sample", "--model", "example-org/absent",
                                   "--sampler", "parallel", "--out", str(tmp_path / "x.jsonl")],
                                  capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert samples(tmp_path / "forced.jsonl") == samples(local), "a forced family must load the same model"
    assert missing_repo.returncode == 2 and "example-org/absent is no directory here, and as a Hugging Face Hub " \
        "repo id it could not be fetched" in missing_repo.stderr and missing_repo.stderr.count("\n") == 1


def test_code_imported_two_levels_down_loads(tmp_path):
    """transformers 4.x copies only a module's direct relative imports from a local folder into its module cache;
    RND1's modeling file imports generation_utils, which imports two more files. Here Dream's does the same."""
    # transformers caches a local folder's code under the folder's name: a fresh name, so no earlier copy helps
    checkpoint = write_checkpoint("dream", tmp_path / f"nested_{uuid.uuid4().hex[:12]}")
    (checkpoint / "dream_helpers.py").write_text("HELPER = 'two levels down'\n")
    with open(checkpoint / "generation_utils.py", "a") as f:
        f.write("\nfrom .dream_helpers import HELPER  # noqa: E402\n")
    model = load_model(checkpoint, trust_remote_code=True)
    assert sys.modules[type(model.model).__module__.rsplit(".", 1)[0] + ".dream_helpers"].HELPER == "two levels down"


def samples(path: Path) -> list[list[int]]:
    return [json.loads(line)["tokens"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", KINDS)
def test_the_whole_pipeline(kind, checkpoints, tmp_path, request):
    """sample with every sampler, trajectories, train-adjust, sample --sampler adjust, eval: all exit 0."""
    model_dir, model = str(checkpoints[kind]), request.getfixturevalue(kind)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    common = ["--model", model_dir, "--trust-remote-code", "--length", "8", "--seed", "1"]
    for spec in ("sequential", "parallel", "threshold", "eb", "punt"):
        k = [] if spec == "sequential" else ["--tokens-per-step", "2"]
        assert cli.main(["sample", *common, "--sampler", spec, *k, "--prompts", str(prompts),
                         "--out", str(tmp_path / f"{spec}.jsonl")]) == 0
        assert all(MASK_ID not in row for row in samples(tmp_path / f"{spec}.jsonl"))
    net = MaskedDiffusionTransformer(MDLMConfig(vocab_size=model.spec.vocab_size, max_length=LENGTH, d_model=32,
                                                n_layers=1, n_heads=4, causal=True))
    scorer = CausalScorer(BuiltinModel(net.eval(), BPETokenizer.load(checkpoints[kind].parent / f"{kind}_tokenizer")))
    for name in ("edlm", "apd"):
        gen = generate(model, make_sampler(name, scorer=scorer), SamplingConfig(length=8, tokens_per_step=2),
                       prompts=PROMPTS[:4])
        assert all(MASK_ID not in row for row in gen.tokens)
    traj, head = tmp_path / "traj", tmp_path / "head"
    assert cli.main(["trajectories", *common, "--num", "16", "--shard-size", "8", "--out", str(traj)]) == 0
    assert cli.main(["train-adjust", "--model", model_dir, "--trust-remote-code", "--trajectories", str(traj),
                     "--out", str(head), "--max-steps", "6", "--batch-size", "8", "--rollout", "3",
                     "--onpolicy-rounds", "0", "--eval-every", "3", "--save-every", "6"]) == 0
    assert cli.main(["sample", *common, "--sampler", "adjust", "--adjust", str(head), "--tokens-per-step", "2",
                     "--num", "3", "--out", str(tmp_path / "adjust.jsonl")]) == 0
    assert cli.main(["eval", "--model", model_dir, "--trust-remote-code", "--adjust", str(head),
                     "--samplers", "parallel,adjust", "--tokens-per-step", "1,2", "--num", "4", "--length", "8",
                     "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "results.json").exists()


def test_samples_agree_across_processes_and_batch_sizes(checkpoints, fresh_process):
    """The same prompts of unequal length at batch size 8 in a fresh process and 1 in this one."""
    _, root = fresh_process
    for kind in KINDS:
        assert cli.main(sample_argv(checkpoints[kind], root / "prompts.txt", 1, root / f"{kind}_1.jsonl")) == 0
        assert samples(root / f"{kind}_8.jsonl") == samples(root / f"{kind}_1.jsonl")


OTHER = os.environ.get("JOINTDLM_OTHER_TRANSFORMERS")
OTHER_SCRIPT = """
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {tests!r})
from pathlib import Path
import test_remote_code as t
from jointdlm.models.loading import load_model
out = {{}}
for kind in t.KINDS:
    t.write_checkpoint(kind, Path({root!r}) / kind)
    model = load_model(Path({root!r}) / kind, trust_remote_code=True)
    with torch.no_grad():
        out[kind] = model.forward(torch.tensor([{tokens!r}])).logits.tolist()
print(json.dumps(out))
"""


@pytest.mark.skipif(OTHER is None, reason="set JOINTDLM_OTHER_TRANSFORMERS to a folder holding another transformers "
                                          "(make test-compat does)")
def test_logits_agree_bit_for_bit_across_transformers_versions(tmp_path):
    """Checkpoints written and run under the other transformers (4.46) give the same logits here, bit for bit:
    the shims change how the code loads, never what it computes."""
    tokens = [BOS_ID, 200, 201, MASK_ID, MASK_ID, MASK_ID]
    script = OTHER_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path), tokens=tokens)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": OTHER})
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"llada", "lladamoe", "dream"} <= set(theirs)  # and RND1 from 4.51 on (its code does not import before)
    for kind in theirs:
        model = load_model(tmp_path / kind, trust_remote_code=True)
        with torch.no_grad():
            ours = model.forward(torch.tensor([tokens])).logits
        assert torch.equal(ours, torch.tensor(theirs[kind], dtype=ours.dtype)), kind


@pytest.mark.skipif(QWEN3_MOE, reason="this transformers has the Qwen3-MoE modules RND1's code imports")
def test_rnd1_under_an_older_transformers_is_one_line(tmp_path):
    checkpoint = write_checkpoint("rnd1", tmp_path / "rnd1")
    with pytest.raises(ValueError, match=f"failed to load under transformers {transformers.__version__}: "
                                         "ModuleNotFoundError"):
        load_model(checkpoint, trust_remote_code=True)


def test_bfloat16_weights_with_float32_sampling(checkpoints, tmp_path, tiny_model_dir, capsys):
    for kind in KINDS:
        model = load_model(checkpoints[kind], trust_remote_code=True, dtype="bfloat16")
        assert next(model.model.parameters()).dtype == torch.bfloat16
        head = AdjustHead(AdjustHeadConfig.for_base(model)).eval()
        gen = generate(model, make_sampler("adjust", head=head), SamplingConfig(length=6, tokens_per_step=2),
                       prompts=PROMPTS[:3])
        assert all(MASK_ID not in row and len(row) == 6 for row in gen.tokens)
        # in bfloat16 on a CPU a left-padded row rounds differently from the row alone: batched by length
        together, alone = (generate(model, make_sampler("parallel"), SamplingConfig(length=8, tokens_per_step=2,
                                                                                      batch_size=b, progress=False),
                                    prompts=PROMPTS) for b in (8, 1))
        assert together.batched_by_length and together.tokens == alone.tokens, kind
    capsys.readouterr()
    code = cli.main(["sample", "--model", str(tiny_model_dir), "--sampler", "parallel", "--dtype", "bfloat16",
                     "--num", "1", "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "runs in float32" in err
