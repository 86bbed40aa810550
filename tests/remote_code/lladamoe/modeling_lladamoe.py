"""Stand-in for LLaDA-MoE's released modeling code (see ../README.md): transformers 4's rotary module (its
`rope_init_fn` looked up as "default", a non-persistent `inv_freq` that the model's own `_init_weights` never
refills and no `reset_rope_parameters()`), top-k routing over experts, `attention_mask` accepted and then dropped
(full attention), and a `forward` with a fixed list of arguments (no `**kwargs`)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_lladamoe import LLaDAConfig


class LLaDAMoERotaryEmbedding(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        scaling = config.rope_scaling
        self.rope_type = (scaling.get("rope_type") or scaling.get("type")) if scaling else "default"
        self.config = config
        self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = self.inv_freq

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        angle = torch.cat([angle, angle], dim=-1)
        return (angle.cos() * self.attention_scaling).to(x.dtype), (angle.sin() * self.attention_scaling).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]


class LLaDAMoEAttention(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(d // self.n_heads, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d // self.n_heads, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(self.q_norm(q), cos, sin), rotate(self.k_norm(k), cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False)
        return self.o_proj(attended.transpose(1, 2).reshape(b, t, d))


class LLaDAMoEExpert(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.expert_intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.expert_intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.expert_intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDAMoESparseMoeBlock(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(LLaDAMoEExpert(config) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = F.softmax(self.gate(flat), dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None].to(flat.dtype))
        return out.view_as(x)


class LLaDAMoEDecoderLayer(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LLaDAMoEAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LLaDAMoESparseMoeBlock(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDAMoEDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:  # as released: Linear and Embedding only
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDAMoEDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LLaDAMoERotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, torch.arange(x.shape[1], device=x.device)[None])
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, cos, sin)
        x = self.norm(x)
        hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None


class LLaDAMoEModelLM(LLaDAMoEPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: object = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, output_router_logits: bool | None = None,
                return_dict: bool | None = None, cache_position: torch.Tensor | None = None,
                num_logits_to_keep: int = 0) -> MoeCausalLMOutputWithPast:
        del attention_mask  # a diffusion model attends everywhere: the mask is dropped, as released
        x, hidden = self.model(input_ids, bool(output_hidden_states))
        return MoeCausalLMOutputWithPast(logits=self.lm_head(x), hidden_states=hidden)
