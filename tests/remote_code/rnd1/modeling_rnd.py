"""Stand-in for RND1's released modeling code (see ../README.md): transformers' own Qwen3-MoE rotary module and
norms (under transformers 5 the rotary buffer is left uninitialised: `_init_weights` is the model's own and never
refills it), a rotary copy in every attention layer, grouped key-value heads, top-k routing over experts,
`attention_mask` handed to SDPA as it comes or added to the scores under eager attention, logits shifted (the
output at i-1 predicts token i), no hidden states in the output, and an `AutoModel` class without an LM head."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput, MoeModelOutputWithPast
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
    apply_rotary_pos_emb,
)

from .configuration_rnd import RND1Config


class RND1Attention(nn.Module):
    def __init__(self, config: RND1Config) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.groups = config.num_attention_heads // config.num_key_value_heads
        d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)
        self.q_norm = Qwen3MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3MoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3MoeRotaryEmbedding(config=config)  # built and never used, as released

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        if self.config._attn_implementation == "sdpa":
            if attention_mask is not None and attention_mask.dtype not in (torch.bool, torch.float32, torch.bfloat16):
                attention_mask = attention_mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=False)
        else:
            scores = q @ k.transpose(2, 3) * self.head_dim ** -0.5
            if attention_mask is not None:
                scores = scores + attention_mask
            out = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class RND1Expert(nn.Module):
    def __init__(self, config: RND1Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.moe_intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RND1SparseMoeBlock(nn.Module):
    def __init__(self, config: RND1Config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(RND1Expert(config) for _ in range(config.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = F.softmax(self.gate(flat), dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None].to(flat.dtype))
        return out.view_as(x)


class RND1DecoderLayer(nn.Module):
    def __init__(self, config: RND1Config) -> None:
        super().__init__()
        self.input_layernorm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = RND1Attention(config)
        self.post_attention_layernorm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = RND1SparseMoeBlock(config)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attention_mask, position_embeddings)
        return x + self.mlp(self.post_attention_layernorm(x))


class RND1PreTrainedModel(PreTrainedModel):
    config_class = RND1Config
    base_model_prefix = "model"
    _no_split_modules = ["RND1DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:  # as released: Linear and Embedding only
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):  # as released: its own
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path,
                                                                   local_files_only=True)
        return model


class RND1Model(RND1PreTrainedModel):
    def __init__(self, config: RND1Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(RND1DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3MoeRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None]
        position_embeddings = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask, position_embeddings)
        return MoeModelOutputWithPast(last_hidden_state=self.norm(x))


class RND1LM(RND1PreTrainedModel):
    def __init__(self, config: RND1Config) -> None:
        super().__init__(config)
        self.model = RND1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, **kwargs)
        return MaskedLMOutput(logits=self.lm_head(out.last_hidden_state))
