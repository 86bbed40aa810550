"""Stand-in for Dream's released modeling code (see ../README.md): shifted logits, a rotary buffer that only
`reset_rope_parameters()` fills, unknown keyword arguments swallowed, and a `from_pretrained` of its own that reads
generation_config.json into `DreamGenerationConfig` after `super().from_pretrained` returned a model."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_dream import DreamConfig
from .generation_utils import DreamGenerationConfig


class DreamRotaryEmbedding(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        scaling = config.rope_scaling
        self.rope_type = (scaling.get("rope_type") or scaling.get("type")) if scaling else "default"
        self.config = config
        self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        inv_freq, self.attention_scaling = self.rope_init_fn(self.config, self.inv_freq.device)
        self.inv_freq = inv_freq

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        angle = torch.cat([angle, angle], dim=-1)
        return (angle.cos() * self.attention_scaling).to(x.dtype), (angle.sin() * self.attention_scaling).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + turned * sin[:, None]


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rotary_emb = DreamRotaryEmbedding(config=config)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | str | None,
                position_ids: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.rotary_emb(v, position_ids)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.o_proj(attended.transpose(1, 2).reshape(b, t, d))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DreamAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | str | None,
                position_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attention_mask, position_ids)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DreamPreTrainedModel(PreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:  # as released: Linear and Embedding only
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=0.02)


class DreamBaseModel(DreamPreTrainedModel):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | str | None,
                position_ids: torch.Tensor | None,
                output_hidden_states: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None]
        hidden = []
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, attention_mask, position_ids)
        x = self.norm(x)
        hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None


class DreamModel(DreamPreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: DreamConfig) -> None:
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model.generation_config = DreamGenerationConfig.from_pretrained(pretrained_model_name_or_path)
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def reset_rope_parameters(self) -> None:
        self.model.rotary_emb.reset_parameters()
        for layer in self.model.layers:
            layer.self_attn.rotary_emb.reset_parameters()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | str | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: object = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                cache_position: torch.Tensor | None = None, num_logits_to_keep: int = 0,
                **loss_kwargs) -> MaskedLMOutput:
        x, hidden = self.model(input_ids, attention_mask, position_ids, bool(output_hidden_states))
        return MaskedLMOutput(logits=self.lm_head(x), hidden_states=hidden)
