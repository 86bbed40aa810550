"""`DiffusionLM` adapter for Hugging Face masked diffusion LMs (LLaDA-8B, Dream-7B, or any transformers model).

Family quirks live in an `HFFamily`: the mask id, whether the network's output at i-1 predicts token i
(Dream: "shifted"), and how the remote code wants padding and positions passed. Everything this adapter
returns is aligned so that position i describes token i, like the built-in model.

Special ids come from the loaded artifacts first (tokenizer, then config.json) and fall back to the family's
known values, so a checkpoint that declares its own ids is used as it is; a mask id that disagrees with the
family's known one is warned about, never silently replaced.

`transformers` is imported only inside `load_hf_model`, so the package works without the `hf` extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .mdlm import CONFIG_FILE, positions_and_mask, read_config
from .protocol import FamilySpec, ModelOutput

MASK_STYLES = ("2d", "4d", "additive", "bias")
FULL_HASH_ELEMENTS = 50_000_000
SAMPLED_ELEMENTS = 4096
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class HFFamily:
    """What differs between diffusion-LM families behind the same transformers interface.

    mask_style says how padding reaches the network (only when a batch has padding; otherwise nothing is
    passed, as the families' own samplers do): "2d" the usual (B, T) `attention_mask`; "4d" a boolean
    (B, 1, T, T) `attention_mask` (Dream's remote code hands it straight to SDPA); "additive" a (B, 1, T, T)
    `attention_mask` of zeros and the dtype's most negative number (RND1's code hands it to SDPA, or adds it to
    the attention scores when the model runs eager attention, which would read a boolean mask as 0/1 scores);
    "bias" a boolean (B, 1, T, T) `attention_bias`. LLaDA's file as released with the Base checkpoint builds a
    bias from either argument but calls SDPA without it, so padding is ignored whatever is passed; a later
    revision of the file (Instruct, October 2025) hands the bias to SDPA, and then "bias" masks padding.
    `HFDiffusionModel.self_check` measures which is the case at load time, and the sampling loop batches prompts
    by length when padding is ignored.
    position_ids=True passes positions that count real tokens only, as Dream's own sampler does; with rotary
    positions and padding masked out this changes nothing but rounding.
    """

    name: str
    default_repo: str | None
    mask_id: int
    shifted_logits: bool
    eos_id: int | None = None
    pad_id: int | None = None
    bos_id: int | None = None
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    mask_style: str = "2d"
    position_ids: bool = False
    auto_classes: tuple[str, ...] = ("AutoModelForCausalLM", "AutoModel")

    def __post_init__(self) -> None:
        if self.mask_style not in MASK_STYLES:
            raise ValueError(f"mask_style must be one of {MASK_STYLES}, got {self.mask_style!r}")


FAMILIES: dict[str, HFFamily] = {
    "llada": HFFamily(
        name="llada", default_repo="GSAI-ML/LLaDA-8B-Base", mask_id=126336, shifted_logits=False,
        eos_id=126081, pad_id=126081, bos_id=126080, model_types=("llada",), architectures=("llada",),
        mask_style="bias", position_ids=False,
    ),
    # LLaDA-MoE's config.json says model_type "llada" (its config class is named LLaDAConfig) and declares no
    # mask id: only its architecture tells it apart, and its mask id is not LLaDA's.
    "lladamoe": HFFamily(
        name="lladamoe", default_repo="inclusionAI/LLaDA-MoE-7B-A1B-Base", mask_id=156895, shifted_logits=False,
        eos_id=156892, pad_id=156892, architectures=("lladamoe",), mask_style="2d",
        auto_classes=("AutoModel", "AutoModelForCausalLM"),
    ),
    "dream": HFFamily(
        name="dream", default_repo="Dream-org/Dream-v0-Base-7B", mask_id=151666, shifted_logits=True,
        eos_id=151643, pad_id=151643, bos_id=151665, model_types=("dream",), architectures=("dream",),
        mask_style="4d", position_ids=True, auto_classes=("AutoModel", "AutoModelForCausalLM"),
    ),
    # RND1 (Radical Numerics, from Qwen3-30B-A3B): shifted like Dream but with no BOS token; its own sampler
    # leaves position 0 out. A canvas here starts with Qwen's document separator <|endoftext|>, which precedes
    # every document in Qwen's packed pre-training, so position 0 is never masked. Its auto_map's AutoModel is
    # the trunk without an LM head; the LM is AutoModelForMaskedLM.
    "rnd1": HFFamily(
        name="rnd1", default_repo="radicalnumerics/RND1-Base-0910", mask_id=151669, shifted_logits=True,
        eos_id=151643, pad_id=151643, bos_id=151643, model_types=("rnd1",), architectures=("rnd1",),
        mask_style="additive", auto_classes=("AutoModelForMaskedLM", "AutoModel"),
    ),
}


def get_family(family: str | HFFamily) -> HFFamily:
    if isinstance(family, HFFamily):
        return family
    if family.lower() not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family.lower()]


# Block-diffusion models: each block of tokens attends only to itself and the blocks before it, and is decoded
# with the earlier blocks fixed. jointdlm's samplers, ADJUST and the adapter give every pass the whole canvas,
# and a block-causal model given that computes without an error: silent garbage. Keyed by what a config's
# model_type or an architecture name contains (LLaDA2.0's "LLaDA2MoeModelLM" also contains "llada"; SDAR's
# model_type also covers TraDo; Fast-dLLM v2 is "Fast_dLLM_Qwen", Qwen2.5 fine-tuned to blocks of `bd_size`).
BLOCK_DIFFUSION = {"llada2": "LLaDA2.x", "sdar": "SDAR", "bd3lm": "BD3-LM", "fast_dllm": "Fast-dLLM v2"}


def refuse_block_diffusion(config: Mapping[str, Any], source: str | Path) -> None:
    """A one-line error for a block-diffusion checkpoint (`BLOCK_DIFFUSION`), whatever family was asked for."""
    names = [str(config.get("model_type", "")).lower()] + [str(a).lower() for a in config.get("architectures") or []]
    for key, model in BLOCK_DIFFUSION.items():
        if any(key in name for name in names):
            raise ValueError(f"{source} is a {model} checkpoint, a block-diffusion model (each block attends only to "
                             "itself and earlier blocks); jointdlm samples masked diffusion models that attend over "
                             "the whole canvas, and would compute garbage with it: not supported")


def detect_family(config: Mapping[str, Any]) -> str | None:
    """The family a config.json belongs to: by a name in `architectures` (the longest family key found in one
    wins, so LLaDA-MoE's "LLaDAMoEModelLM" is not taken for LLaDA), else by `model_type`; None if neither."""
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a).lower() for a in config.get("architectures") or []]
    found = [(len(key), name) for name, family in FAMILIES.items() for key in family.architectures
             if any(key in arch for arch in architectures)]
    if found:
        return max(found)[1]
    for name, family in FAMILIES.items():
        if model_type in family.model_types:
            return name
    return None


class HFTokenizer:
    """`TextTokenizer` view of a transformers tokenizer: no special tokens in, none out.

    Special-token strings typed in the text stay text (`split_special_tokens`), so a prompt can never smuggle
    in a mask or EOS id.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        self._end_of_turn: list[int] | None = None

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_chat(self, text: str) -> list[int]:
        """`text` as one user turn in the checkpoint's own chat template, with the assistant's turn opened (what
        instruct checkpoints were trained on). The template's special tokens are parsed; `encode_prompts`
        refuses a prompt that thereby gains a mask id."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this checkpoint's tokenizer has no chat template (a base model?): leave out --chat")
        templated = self.hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
        return self.encode_templated(templated)

    def encode_templated(self, text: str) -> list[int]:
        """Text already in a chat template (lm-eval applies it itself): special tokens parsed, none added."""
        return list(self.hf(text, add_special_tokens=False, split_special_tokens=False)["input_ids"])

    def end_of_turn_ids(self) -> list[int]:
        """The special token the checkpoint's chat template closes an assistant's turn with (LLaDA-Instruct's
        <|eot_id|>, Qwen-style <|im_end|>), found by rendering one turn; none without a template. What follows it
        is not part of the answer, and decoding, which drops special tokens, would glue it onto the answer."""
        if self._end_of_turn is None:
            self._end_of_turn = self._find_end_of_turn()
        return self._end_of_turn

    def _find_end_of_turn(self) -> list[int]:
        if not getattr(self.hf, "chat_template", None):
            return []
        probe = "jointdlm end-of-turn probe"
        try:
            text = self.hf.apply_chat_template([{"role": "user", "content": "a"},
                                                {"role": "assistant", "content": probe}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that needs other roles or arguments: no end-of-turn known
            return []
        at = text.rfind(probe)
        after = self.encode_templated(text[at + len(probe):]) if at >= 0 else []
        special = set(getattr(self.hf, "all_special_ids", []))
        special |= {int(i) for i, token in (getattr(self.hf, "added_tokens_decoder", None) or {}).items()
                    if getattr(token, "special", False)}
        return [after[0]] if after and after[0] in special else []


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "<mask>", "[MASK]")


def _mask_id(family: HFFamily, tokenizer: Any, config: Any, vocab_size: int) -> int:
    """The mask id a checkpoint declares (tokenizer, then config); else the family's known id where the tokenizer
    holds a mask token; else the id of a mask token the tokenizer holds (LLaDA-MoE declares none); never an
    ordinary word's id."""
    for source in (tokenizer, config):
        found = _first_id(getattr(source, "mask_token_id", None))
        if found is not None:
            return found
    at_known = None
    if 0 <= family.mask_id < vocab_size:
        convert = getattr(tokenizer, "convert_ids_to_tokens", None)
        at_known = convert(family.mask_id) if callable(convert) else None
    if isinstance(at_known, str) and "mask" in at_known.lower():
        return family.mask_id
    vocabulary = getattr(tokenizer, "get_vocab", dict)()  # built once: 150k entries for the real families
    for token in MASK_TOKENS:
        if token in vocabulary:
            return int(vocabulary[token])
    held = "nothing" if at_known is None else repr(at_known)
    raise ValueError(f"the checkpoint declares no mask id (no mask_token in the tokenizer, no mask_token_id in "
                     f"config.json), and at the {family.name} family's mask id {family.mask_id} its tokenizer holds "
                     f"{held}: add \"mask_token_id\" to config.json")


def resolve_spec(family: HFFamily, tokenizer: Any, config: Any, vocab_size: int) -> FamilySpec:
    """Special ids from the tokenizer, then the model config, then the family's known values."""

    def pick(attr: str, fallback: int | None) -> int | None:
        for source in (tokenizer, config):
            found = _first_id(getattr(source, attr, None))
            if found is not None:
                return found
        return fallback

    mask_id = _mask_id(family, tokenizer, config, vocab_size)
    if mask_id != family.mask_id:
        warnings.warn(f"the {family.name} family's mask id is {family.mask_id}, but this checkpoint declares "
                      f"{mask_id}; using {mask_id}", stacklevel=3)
    eos_id = pick("eos_token_id", family.eos_id)
    if eos_id is None:
        raise ValueError(f"no EOS id in the tokenizer, the config or the {family.name} family")
    pad_id = pick("pad_token_id", family.pad_id)
    bos_id = pick("bos_token_id", family.bos_id)
    if family.shifted_logits and bos_id is None:
        raise ValueError(f"the {family.name} family has shifted logits and needs a BOS token, so that position 0 "
                         "(whose output predicts token 1) is never masked; the tokenizer and config declare none")
    return FamilySpec(name=family.name, vocab_size=vocab_size, mask_id=mask_id, eos_id=eos_id,
                      pad_id=eos_id if pad_id is None else pad_id, bos_id=bos_id,
                      shifted_logits=family.shifted_logits)


def _config_value(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def hf_fingerprint(config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                   full_hash_elements: int = FULL_HASH_ELEMENTS) -> str:
    """Hash of config, every tensor's name/shape/dtype, and its values.

    Up to `full_hash_elements` parameters every value is hashed; above that (an 8B model: minutes of hashing)
    only `SAMPLED_ELEMENTS` evenly spaced values per tensor are, first and last included. A sampled fingerprint
    tells different checkpoints apart, but can miss an edit that touches none of the sampled values.
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    total = sum(t.numel() for t in state.values())
    sampled = total > full_hash_elements
    digest.update(b"sampled" if sampled else b"full")
    for name in sorted(state):
        t = state[name]
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if sampled and t.numel() > SAMPLED_ELEMENTS:
            # In integers: float32 positions past 2**24 round, and the last one could land past the end.
            index = torch.arange(SAMPLED_ELEMENTS, device=t.device) * (t.numel() - 1) // (SAMPLED_ELEMENTS - 1)
            t = t.detach().reshape(-1)[index]
        digest.update(_tensor_bytes(t))
    return digest.hexdigest()[:16]


class HFDiffusionModel:
    """`DiffusionLM` adapter around a transformers model and its tokenizer.

    hidden: HF's `hidden_states[-1]` (for Llama-style code, LLaDA and Dream: after the final norm), re-aligned
    like the logits when the family is shifted, and returned in `hidden_dtype` (float32 by default, so a float32
    ADJUST head can sit on a bfloat16 base; None keeps the model's dtype). `lm_head(h)` applies `final_norm`
    (for code whose `hidden_states[-1]` is taken before the final norm; None for LLaDA and Dream), the output
    embedding's weight and `logit_scale` (None: LLaDA's `scale_logits` convention read from the config).

    Shifted families: aligned[:, i] = raw[:, i-1] for i >= 1 and aligned[:, 0] = raw[:, 0]. Position 0, and
    with left padding the first real token, is BOS or prompt and never masked, so what it holds is never used.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, family: str | HFFamily, *, max_length: int | None = None,
                 final_norm: nn.Module | None = None, logit_scale: float | None = None,
                 hidden_dtype: torch.dtype | None = torch.float32,
                 full_hash_elements: int = FULL_HASH_ELEMENTS) -> None:
        self.model = model
        self.family = get_family(family)
        self.tokenizer = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer(tokenizer)
        self.config = model.config
        output = model.get_output_embeddings()
        if output is None:
            raise ValueError(f"{type(model).__name__} has no output embedding; load it with its LM head "
                             "(AutoModelForCausalLM or the family's remote class)")
        self.final_norm = final_norm
        d_model = self.block_shape()[0]
        if logit_scale is None:
            logit_scale = 1 / math.sqrt(d_model) if getattr(self.config, "scale_logits", False) else 1.0
        self.logit_scale = logit_scale
        self.hidden_dtype = hidden_dtype
        self.full_hash_elements = full_hash_elements
        self.hidden_size = d_model
        positions = _config_value(self.config, "max_position_embeddings", "max_sequence_length", "n_positions")
        if max_length is None and positions is None:
            raise ValueError("the config gives no maximum length; pass max_length")
        self.max_length = int(max_length if max_length is not None else positions)
        self.spec = resolve_spec(self.family, self.tokenizer.hf, self.config, output.weight.shape[0])
        self._fingerprint: str | None = None
        # Whether a left-padded row computes what the same row alone does; `self_check` measures it. The sampling
        # loop batches prompts by length when it is False, so samples never depend on the batch.
        self.honours_padding = True
        self._forward_reads: dict[str, bool] = {}
        self._states_missing: bool | None = None  # the model's output lacks hidden states (None: not seen yet)
        self.generation_stops: tuple[int, ...] = ()
        """Ids the checkpoint's generation_config.json ends generation at (`eos_token_id`, an id or a list, as
        transformers' `generate` reads it), besides the spec's EOS; `load_hf_model` fills it."""

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def pads_exactly(self) -> bool:
        """Whether a left-padded row computes bit for bit what the row alone does: the code reads the padding
        (`honours_padding`) and the weights are float32, or on a GPU (where a bfloat16 product depends on the
        batch anyway, docs/results.md §6). In bfloat16 on a CPU a padded row rounds differently from the row
        alone (RND1, whose config asks for bfloat16: 4 of 8 prompts of unequal length kept their sample at batch
        1 and 8, §8), so the sampling loop then batches prompts by length, as for code that ignores padding."""
        reduced = self.model.get_input_embeddings().weight.dtype in (torch.bfloat16, torch.float16)
        return self.honours_padding and not (reduced and self.device.type == "cpu")

    def block_shape(self) -> tuple[int, int, int, float]:
        """(d_model, n_heads, mlp_hidden, rope_theta) of one block, for an ADJUST head of the same shape."""
        c = self.config
        d_model = _config_value(c, "hidden_size", "d_model", "n_embd")
        n_heads = _config_value(c, "num_attention_heads", "n_heads", "n_head")
        if d_model is None or n_heads is None:
            raise ValueError(f"cannot read the hidden size and head count from {type(c).__name__}")
        mlp_hidden = _config_value(c, "intermediate_size", "mlp_hidden_size")
        if mlp_hidden is None:
            mlp_hidden = int(_config_value(c, "mlp_ratio") or 4) * d_model
        theta = _config_value(c, "rope_theta")
        if theta is None:
            theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return int(d_model), int(n_heads), int(mlp_hidden), float(theta)

    def _inputs(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": tokens, "output_hidden_states": True, "use_cache": False}
        if self._reads("return_dict"):  # code whose config says return_dict=False would hand back a tuple
            inputs["return_dict"] = True
        if attention_mask is None or bool(attention_mask.all()):
            return inputs
        positions, square = positions_and_mask(attention_mask, tokens.shape, False, tokens.device)
        style = self.family.mask_style
        name = "attention_bias" if style == "bias" else "attention_mask"
        if style == "additive":
            dtype = self.model.get_input_embeddings().weight.dtype
            square = torch.zeros(square.shape, dtype=dtype, device=square.device).masked_fill(
                ~square, torch.finfo(dtype).min)
        if self._reads(name):  # else padding cannot reach the network: `self_check` finds it ignored
            inputs[name] = attention_mask if style == "2d" else square
        if self.family.position_ids and self._reads("position_ids"):
            inputs["position_ids"] = positions
        return inputs

    def _reads(self, argument: str) -> bool:
        """Whether the model's forward takes this keyword (code that takes no **kwargs would raise TypeError)."""
        if argument not in self._forward_reads:
            self._forward_reads[argument] = _accepts(self.model.forward, argument)
        return self._forward_reads[argument]

    def _check_first_token(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        first = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        if attention_mask is not None:
            first = attention_mask.long().argmax(-1)
        if bool((tokens.gather(1, first[:, None]) == self.spec.mask_id).any()):
            raise ValueError(f"the {self.family.name} family's logits are shifted: the first real token must be "
                             "BOS or prompt, never a mask")

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> ModelOutput:
        """Remote model code computes logits everywhere; `at` selects from them."""
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_length={self.max_length}")
        if self.family.shifted_logits:
            self._check_first_token(tokens, attention_mask)
        captured: list[torch.Tensor] = []
        head = self.model.get_output_embeddings()
        # Code whose output carries no hidden states (it drops output_hidden_states): the LM head's input is the
        # last hidden state. Not for a tied nn.Embedding head, whose forward sees the input ids. Once a pass has
        # returned hidden states, no hook is placed again.
        hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0])) \
            if self._states_missing is not False and isinstance(head, nn.Linear) else None
        try:
            out = self.model(**self._inputs(tokens, attention_mask))
        finally:
            if hook is not None:
                hook.remove()
        if isinstance(out, (tuple, list)):  # (logits, ...) from code that ignores return_dict
            logits_only, states = out[0], None
        else:
            logits_only, states = out.logits, getattr(out, "hidden_states", None)
        self._states_missing = states is None
        if states is None and not captured:
            raise ValueError(f"{type(self.model).__name__} returns no hidden states and its LM head is not a "
                             "linear layer: its last hidden state cannot be read")
        logits, hidden = logits_only, states[-1] if states is not None else captured[-1]
        if self.family.shifted_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
        if self.hidden_dtype is not None:
            hidden = hidden.to(self.hidden_dtype)
        return ModelOutput(logits=logits if at is None else logits[at], hidden=hidden)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.model.get_input_embeddings()(tokens)
        return embedded if self.hidden_dtype is None else embedded.to(self.hidden_dtype)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.normed(hidden))

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.final_norm is None:
            return hidden
        return self.final_norm(hidden.to(self.model.get_output_embeddings().weight.dtype))

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        """Applied through the weight, not the module: LLaDA's tied output embedding is an `nn.Embedding`."""
        output = self.model.get_output_embeddings()
        logits = F.linear(normed.to(output.weight.dtype), output.weight, getattr(output, "bias", None))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            config = {k: v for k, v in self.config.to_dict().items()
                      if not k.startswith("_") and k != "transformers_version"}
            config["jointdlm_spec"] = asdict(self.spec)
            self._fingerprint = hf_fingerprint(config, self.model.state_dict(), self.full_hash_elements)
        return self._fingerprint

    def check_head(self) -> None:
        """One short pass showing `lm_head(hidden) == logits`, i.e. that the hidden-state convention holds."""
        bos = self.spec.bos_id if self.spec.bos_id is not None else self.spec.eos_id
        tokens = torch.tensor([[bos] + [self.spec.mask_id] * 3], device=self.device)
        with torch.no_grad():
            out = self.forward(tokens)
            logits, again = out.logits.float(), self.lm_head(out.hidden).float()
        error = ((again - logits).norm() / logits.norm().clamp(min=1e-12)).item()
        if not error < 0.05:
            raise ValueError(f"lm_head(hidden_states[-1]) differs from the model's logits (relative error "
                             f"{error:.3g}); this model may apply a final norm outside hidden_states[-1]: "
                             "pass final_norm= (and logit_scale=) to HFDiffusionModel")

    def self_check(self, tolerance: float = 0.05) -> None:
        """Catch what loads without an error but computes garbage, on one short canvas.

        Rotary `inv_freq` buffers must look like rotary frequencies (transformers 5 leaves buffers that are not
        in the checkpoint uninitialised unless the model's own init refills them); logits must be finite; two
        identical passes must agree bit for bit. Then a left-padded copy of the canvas is compared with the
        canvas alone: when they differ, the model's code ignores padding (or the family passes padding the way
        this code does not read), and `honours_padding` becomes False.
        """
        for name, buffer in self.model.named_buffers():
            if name.rsplit(".", 1)[-1] == "inv_freq" and not _looks_like_rotary(buffer):
                raise ValueError(f"the rotary buffer {name} holds no rotary frequencies (uninitialised at load?); "
                                 "the model's code does not refill it under this transformers version")
        spec = self.spec
        first = spec.bos_id if spec.bos_id is not None else spec.eos_id
        words = [i for i in self.tokenizer.encode("the check of a model") if i != spec.mask_id][:4] or [first]
        tokens = torch.tensor([[first, *words, *[spec.mask_id] * 4]], device=self.device)
        pad = 3
        padded = torch.cat([torch.full((1, pad), spec.pad_id, device=self.device), tokens], dim=1)
        attention = torch.ones_like(padded)
        attention[:, :pad] = 0
        with torch.no_grad():
            once, twice = self.forward(tokens).logits, self.forward(tokens).logits
            if not bool(torch.isfinite(once).all()):
                raise ValueError("the model produced NaN/Inf logits on a short check canvas (check the weights and "
                                 "the dtype)")
            if not torch.equal(once, twice):
                raise ValueError("two identical forward passes gave different logits: the model reads "
                                 "uninitialised memory or is not in eval mode")
            alone = once[:, 1:].float()
            batched = self.forward(padded, attention).logits[:, pad + 1:].float()
        error = ((batched - alone).norm() / alone.norm().clamp(min=1e-12)).item()
        self.honours_padding = error < tolerance
        if not self.honours_padding:
            warnings.warn(f"{type(self.model).__name__} ignores padding (a left-padded prompt's logits differ by "
                          f"{error:.0%} from the same prompt alone); prompts will be batched by length, so samples "
                          "do not depend on the batch", stacklevel=3)

    def to(self, device: str | torch.device) -> HFDiffusionModel:
        self.model.to(device)
        return self

    def eval(self) -> HFDiffusionModel:
        self.model.eval()
        return self


def _looks_like_rotary(inv_freq: torch.Tensor) -> bool:
    """Rotary frequencies are finite, in (0, 1] and non-increasing (uninitialised memory almost never is)."""
    values = inv_freq.detach().float().reshape(-1)
    if values.numel() == 0 or not bool(torch.isfinite(values).all()):
        return False
    return bool((values > 0).all() and (values <= 1).all() and (values[1:] <= values[:-1]).all())


def _transformers_major() -> int:
    import transformers

    return int(re.findall(r"\d+", transformers.__version__)[0])


def _default_rope_init(config: Any, device: torch.device | str | None = None, *args: Any,
                       **kwargs: Any) -> tuple[torch.Tensor, float]:
    """transformers 4.x's "default" rotary init, which released remote code (Dream) still asks for by name."""
    parameters = getattr(config, "rope_parameters", None) or {}
    base = parameters.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * (parameters.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", 1.0)))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (base ** exponent), 1.0


@contextlib.contextmanager
def _default_rope_available() -> Iterator[None]:
    """Lend transformers 5 the "default" rotary init while remote code is built, then take it back."""
    from transformers import modeling_rope_utils

    table = modeling_rope_utils.ROPE_INIT_FUNCTIONS
    added = "default" not in table
    if added:
        table["default"] = _default_rope_init
    try:
        yield
    finally:
        if added:
            table.pop("default", None)


def _accepts(function: Any, name: str) -> bool:
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@contextlib.contextmanager
def _lenient_generation_configs(cls: type) -> Iterator[None]:
    """While `cls` loads, lend the generation-config classes its module uses a `validate()` that takes what
    transformers passes.

    Released Dream overrides `from_pretrained` to read `generation_config.json` into its own `GenerationConfig`
    subclass, whose `validate(self, is_init=False)` predates the `user_set_attributes` argument that newer
    transformers passes while reading it: the load fails with a TypeError although the generation config plays
    no part in our sampling. The module's name is pointed at a subclass that drops unknown arguments, and pointed
    back afterwards; the checkpoint's files are not touched.
    """
    from transformers import GenerationConfig

    module = sys.modules.get(cls.__module__)
    namespace = vars(module) if module is not None else {}
    swapped: dict[str, type] = {}
    for name, value in list(namespace.items()):
        if (not isinstance(value, type) or not issubclass(value, GenerationConfig) or value is GenerationConfig
                or _accepts(value.validate, "user_set_attributes")):
            continue
        known = set(inspect.signature(value.validate).parameters)

        def validate(self: Any, *args: Any, _original: Any = value.validate, _known: set = known,
                     **kwargs: Any) -> Any:
            return _original(self, *args, **{k: v for k, v in kwargs.items() if k in _known})

        swapped[name] = value
        namespace[name] = type(value.__name__, (value,), {"validate": validate, "__module__": value.__module__,
                                                          "__qualname__": value.__qualname__})
    try:
        yield
    finally:
        namespace.update(swapped)


def _compatible(cls: type) -> type:
    """A subclass of remote model code written for transformers 4.x that loads under 5.x, or `cls` itself.

    Two shims, both at load time (the checkpoint's files are never edited): a class whose `__init__` never calls
    `post_init()` (LLaDA) gets it called, since 5.x reads what it sets; a `tie_weights()` that takes no arguments
    (LLaDA) accepts and ignores the ones 5.x passes.
    """
    attrs: dict[str, Any] = {}
    if _transformers_major() >= 5:
        original_init = cls.__init__

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            if not hasattr(self, "all_tied_weights_keys"):
                self.post_init()

        attrs["__init__"] = __init__
    parameters = inspect.signature(cls.tie_weights).parameters
    if len(parameters) == 1:  # only self
        original_tie = cls.tie_weights

        def tie_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
            return original_tie(self)

        attrs["tie_weights"] = tie_weights
    if not attrs:
        return cls
    return type(cls.__name__, (cls,), {**attrs, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _load_with_info(cls: type, source: str, options: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """`cls.from_pretrained(source)` and transformers' loading info (missing keys), also when the class overrides
    `from_pretrained` and expects a model back from `super()`, not (model, info) (released Dream does).

    A class placed just above `PreTrainedModel` in a subclass's method order asks for the info and hands the
    model alone back up the chain, so the checkpoint's own `from_pretrained` runs unchanged.
    """
    from transformers import PreTrainedModel

    info: dict[str, Any] = {}

    class RecordLoadingInfo(PreTrainedModel):
        @classmethod
        def from_pretrained(klass, *args: Any, **kwargs: Any) -> Any:
            asked = kwargs.pop("output_loading_info", False)  # by the checkpoint's own from_pretrained
            model, found = super().from_pretrained(*args, output_loading_info=True, **kwargs)
            info.update(found)
            return (model, found) if asked else model

    recording = type(cls.__name__, (cls, RecordLoadingInfo),
                     {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return recording.from_pretrained(source, **options), info


def _refill_rotary(model: nn.Module) -> None:
    """Recompute rotary tables that transformers 5 left uninitialised (buffers not stored in the checkpoint).

    transformers 5 refills rotary modules itself only through its own `_init_weights`; remote code that overrides
    it leaves them as allocated. Each `inv_freq` that does not hold rotary frequencies is computed again by its
    module's own function: a transformers 4 module's `rope_init_fn(config, device, **rope_kwargs)` (Dream and
    LLaDA-MoE keep their own copy; Dream's `reset_rope_parameters()` calls the same), else a transformers 5 module's
    function for its `rope_type` (`compute_default_rope_parameters(config)` for "default"; RND1 builds 5.x's Qwen3
    rotary module). What is still wrong afterwards, `self_check` refuses.
    """
    from transformers import modeling_rope_utils

    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        config = getattr(module, "config", None)
        if not isinstance(inv_freq, torch.Tensor) or _looks_like_rotary(inv_freq) or config is None:
            continue
        init = getattr(module, "rope_init_fn", None)
        arguments: tuple[Any, ...] = (config, inv_freq.device)  # transformers 4's signature
        kwargs = dict(getattr(module, "rope_kwargs", None) or {})
        if not callable(init):
            rope_type = getattr(module, "rope_type", "default")
            init = getattr(module, "compute_default_rope_parameters", None) if rope_type == "default" else \
                modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(rope_type)
            arguments, kwargs = (config,), {}  # transformers 5's, as its own `_init_weights` calls it
            if not callable(init):
                continue
        try:
            with _default_rope_available():
                values, scaling = init(*arguments, **kwargs)
        except Exception:  # noqa: BLE001 - the checkpoint's own code; self_check reports the buffer
            continue
        with torch.no_grad():
            inv_freq.copy_(values.to(inv_freq.device, inv_freq.dtype))
        original = getattr(module, "original_inv_freq", None)
        if isinstance(original, torch.Tensor) and original.shape == inv_freq.shape:
            with torch.no_grad():
                original.copy_(inv_freq)
        elif hasattr(module, "original_inv_freq"):
            module.original_inv_freq = module.inv_freq
        if hasattr(module, "attention_scaling"):
            module.attention_scaling = scaling


def _load_failure(what: str, err: Exception) -> ValueError:
    """One line for an exception raised while loading: what failed, the transformers version, the error's first line."""
    import transformers

    first = (str(err).splitlines() or [""])[0]
    return ValueError(f"{what} failed to load under transformers {transformers.__version__}: "
                      f"{type(err).__name__}: {first}")


def _cache_remote_code(source: str) -> None:
    """Copy every Python file the checkpoint's `auto_map` modules (model and tokenizer) import, however deep, into
    transformers' module cache before any class is loaded from a local folder.

    transformers 4.x (4.57 included) copies only a module's direct relative imports from a local folder: RND1's
    `modeling_rnd` imports `generation_utils`, which imports `generation_config` and `sampling`, and the load then
    fails on a file missing from the cache (a Hub repo id takes another path, which follows every level)."""
    from transformers.dynamic_module_utils import get_cached_module_file, get_relative_import_files

    directory = Path(source)
    for module in (directory / name for name in sorted(_auto_map_modules(directory))):
        if module.is_file():  # else another repository's code ("repo--module.Class"): transformers fetches it
            for imported in get_relative_import_files(str(module)):
                get_cached_module_file(source, Path(imported).name, local_files_only=True)


def _own_config(source: str) -> Any:
    """The checkpoint's config read by its own class (`auto_map`), or None if it names none.

    transformers 5's AutoConfig prefers a class that remote code registered for the same model_type when it was
    imported (released LLaDA registers "llada"), so after a LLaDA checkpoint, LLaDA-MoE's config.json (model_type
    "llada" too) would be read by LLaDA's class; the tokenizer's loader asks AutoConfig. Handing it this config
    keeps each checkpoint on its own classes.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    reference = (read_config(Path(source) / CONFIG_FILE).get("auto_map") or {}).get("AutoConfig")
    if reference is None:
        return None
    try:
        config_class = get_class_from_dynamic_module(reference, source, local_files_only=True)
        with _default_rope_available():
            config = config_class.from_pretrained(source, local_files_only=True)
    except Exception as err:  # the checkpoint's own code: anything can be raised
        raise _load_failure(f"{source}'s own config class ({reference})", err) from None
    legacy_rope(config)
    return config


def legacy_rope(config: Any) -> None:
    """Give a config written for transformers 4.x the rotary settings 5.x reads, in place.

    5.x's rotary modules read `config.rope_parameters` (a dict with `rope_type` and `rope_theta`); a 4.x config
    class that sets `rope_scaling = False` (RND1's, on every config it builds) leaves `rope_parameters` False, and
    the model fails while it is built. In 4.x a false `rope_scaling` meant plain rotary positions at `rope_theta`:
    that is what such a config gets."""
    if _transformers_major() < 5 or isinstance(getattr(config, "rope_parameters", None), dict):
        return
    theta = getattr(config, "rope_theta", None)
    if isinstance(theta, (int, float)) and not isinstance(theta, bool):
        config.rope_parameters = {"rope_type": "default", "rope_theta": float(theta)}


def _load_remote(source: str, family: HFFamily, options: dict[str, Any]) -> tuple[nn.Module | None, list[str]]:
    """Load through the classes the checkpoint's own `auto_map` names, imported by content hash.

    The process-wide Auto registries are bypassed: remote code registers its classes by `model_type` when it is
    imported, so through them a second checkpoint of the same family would silently get the first one's classes.
    Any exception the checkpoint's code raises becomes a one-line error.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = read_config(Path(source) / CONFIG_FILE).get("auto_map") or {}
    tried = []
    for name in family.auto_classes:
        reference = auto_map.get(name)
        if reference is None:
            tried.append(f"{name}: not in the checkpoint's auto_map")
            continue
        try:
            loaded = get_class_from_dynamic_module(reference, source, local_files_only=True)
            with _default_rope_available(), _lenient_generation_configs(loaded):
                model, info = _load_with_info(_compatible(loaded), source,
                                              {k: v for k, v in options.items() if k != "trust_remote_code"})
        except Exception as err:  # the checkpoint's own code: anything can be raised
            raise _load_failure(f"{source}'s own code ({reference})", err) from None
        if model.get_output_embeddings() is None:
            tried.append(f"{name}: loaded {type(model).__name__}, which has no LM head")
            continue
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(f"{source}: the weights file lacks {len(missing)} of the model's weights "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they would be random")
        _refill_rotary(model)
        return model, tried
    return None, tried


def _load_auto(source: str, family: HFFamily, options: dict[str, Any],
               where: str) -> tuple[nn.Module | None, list[str]]:
    """Load through transformers' Auto classes, trying the family's in order."""
    import transformers

    tried = []
    for name in family.auto_classes:
        try:
            candidate = getattr(transformers, name).from_pretrained(source, **options)
        except ValueError as err:
            tried.append(f"{name}: {str(err).splitlines()[0]}")
            continue
        except OSError as err:
            raise OSError(f"could not load model weights from {where}: {err}") from None
        except Exception as err:  # noqa: BLE001 - a failure inside transformers or the model's code
            raise _load_failure(f"{name} on {source}", err) from None
        if candidate.get_output_embeddings() is None:
            tried.append(f"{name}: loaded {type(candidate).__name__}, which has no LM head")
            continue
        return candidate, tried
    return None, tried


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return getattr(torch, dtype)
    return dtype


TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def locate(path_or_repo: str | Path) -> tuple[str, bool]:
    """(what to hand transformers, whether it is a local directory); a clear error for a missing directory."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; is it a model directory?")
        return str(path), True
    text = str(path_or_repo)
    if path.exists() or not _REPO_ID.match(text):
        raise FileNotFoundError(f"model directory {text} does not exist (nor is it a Hub repo id like "
                                "GSAI-ML/LLaDA-8B-Base)")
    return text, False


# What a checkpoint needs from the Hub: configs, code, tokenizer files and safetensors weights (not every weight
# format a repository may hold besides them).
SNAPSHOT_FILES = ("*.json", "*.py", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*")


def snapshot(repo_id: str) -> str:
    """A Hub repo id as a local snapshot folder (downloaded, or the cached one when offline), so that it loads
    exactly as a local checkpoint does: through its own classes with the shims (transformers' Auto classes alone
    cannot build the released LLaDA, Dream or RND1 under transformers 5) and behind the remote-code opt-in."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(SNAPSHOT_FILES)))
        if not any(folder.glob("*.safetensors")):  # weights only as pytorch_model*.bin
            folder = Path(snapshot_download(repo_id, allow_patterns=[*SNAPSHOT_FILES, "*.bin"]))
    except Exception as err:  # noqa: BLE001 - network, authentication, a missing repository: one line
        first = (str(err).splitlines() or [""])[0]
        raise OSError(f"{repo_id} is no directory here, and as a Hugging Face Hub repo id it could not be fetched "
                      f"(not in the Hub cache, or the Hub not reachable): {type(err).__name__}: {first}") from None
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"the Hub repo {repo_id} has no {CONFIG_FILE}; is it a model repository?")
    return str(folder)


def _auto_map_modules(directory: Path) -> set[str]:
    """The module files the `auto_map` of a checkpoint's config.json and of its tokenizer_config.json name (a
    tokenizer can ship its own code too: Dream's does)."""
    auto_maps = [read_config(directory / CONFIG_FILE).get("auto_map") or {}]
    if (directory / TOKENIZER_CONFIG_FILE).is_file():
        auto_maps.append(read_config(directory / TOKENIZER_CONFIG_FILE).get("auto_map") or {})
    modules = set()
    for target in (t for auto_map in auto_maps if isinstance(auto_map, dict) for t in auto_map.values()):
        for ref in (target if isinstance(target, list) else [target]):
            if isinstance(ref, str) and "." in ref:
                modules.add(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return modules


def remote_code_files(directory: str | Path) -> list[str]:
    """The Python files a checkpoint asks transformers to import (`_auto_map_modules`), and every other .py beside
    them; none when its auto_maps name no code."""
    directory = Path(directory)
    modules = _auto_map_modules(directory)
    if not modules:
        return []
    present = sorted(p.name for p in directory.glob("*.py"))
    return sorted(modules | set(present))


def load_hf_model(path_or_repo: str | Path | None, family: str | HFFamily, device: str | torch.device = "cpu",
                  dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
                  max_length: int | None = None, check: bool = True) -> HFDiffusionModel:
    """Load model + tokenizer from a local directory (never touching the network) or a Hub repo id (its config,
    code, tokenizer and safetensors weights fetched into the Hub cache first, or read from it offline, then loaded
    as a local directory).

    `path_or_repo=None` uses the family's default repo. The family's auto classes are tried in order; a class
    the checkpoint does not register, or one that comes without an LM head, is skipped. A checkpoint whose
    config.json names its own Python code (`auto_map`) is refused unless `trust_remote_code=True`: that code runs
    with the user's rights when it is imported. Trusted remote code is loaded through its own classes,
    with the shims that let code released for transformers 4.x load under 5.x (`_compatible`, `_refill_rotary`,
    `_lenient_generation_configs`) and its own `from_pretrained` unchanged (`_load_with_info`).
    `check` runs `check_head` and `self_check` once on a few tokens.
    """
    family = get_family(family)
    if path_or_repo is None:
        if family.default_repo is None:
            raise ValueError(f"the {family.name} family has no default repo; give a path")
        path_or_repo = family.default_repo
    source, local = locate(path_or_repo)
    if not local:
        source = snapshot(source)
    refuse_block_diffusion(read_config(Path(source) / CONFIG_FILE), source)
    if not trust_remote_code:
        code = remote_code_files(source)
        if code:
            raise ValueError(f"{source} ships its own Python code ({', '.join(code)}), which would run on loading; "
                             "pass --trust-remote-code (trust_remote_code=True) if you trust where it came from")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("loading Hugging Face models needs transformers: pip install 'jointdlm[hf]'") from err
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    remote = trust_remote_code and bool(remote_code_files(source))
    if remote:
        try:
            _cache_remote_code(source)
        except Exception as err:  # noqa: BLE001 - a missing file or a package the code imports
            raise _load_failure(f"{source}'s own code", err) from None
    own_config = _own_config(source) if remote else None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source, **options, **({"config": own_config} if own_config is not None else {}))
    except (OSError, ValueError) as err:
        raise OSError(f"could not load a tokenizer from {source}: {err}") from None
    if dtype is not None:
        major_minor = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
        options["dtype" if major_minor >= (4, 56) else "torch_dtype"] = _dtype(dtype)
    model, tried = None, []
    if remote:
        model, tried = _load_remote(source, family,
                                    {**options, **({"config": own_config} if own_config is not None else {})})
    if model is None:
        model, more = _load_auto(source, family, options, source)
        tried += more
    if model is None:
        raise ValueError(f"no auto class loads {source} as a {family.name} model with an LM head; "
                         + "; ".join(tried))
    model.requires_grad_(False)
    adapter = HFDiffusionModel(model.eval(), tokenizer, family, max_length=max_length).to(device)
    generation = Path(source) / GENERATION_CONFIG_FILE
    if generation.is_file():
        ids = read_config(generation).get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids]
        adapter.generation_stops = tuple(sorted({int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool)
                                                 and 0 <= i < adapter.spec.vocab_size}))
    if check:  # the self-check first: uninitialised rotary buffers can hold NaN, which check_head would misname
        adapter.self_check()
        adapter.check_head()
    return adapter
