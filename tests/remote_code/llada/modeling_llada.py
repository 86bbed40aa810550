"""Stand-in for LLaDA's released modeling code (see ../README.md): padding never reaches attention."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate (B, H, T, hd) by positions 0..T-1, padding included (the released code takes no positions)."""
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class LLaDABlock(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, device = config.d_model, "cpu"
        self.n_heads = config.n_heads
        self.theta = config.rope_theta
        self.attn_norm = nn.RMSNorm(d, device=device)
        self.q_proj = nn.Linear(d, d, bias=False, device=device)
        self.k_proj = nn.Linear(d, d, bias=False, device=device)
        self.v_proj = nn.Linear(d, d, bias=False, device=device)
        self.attn_out = nn.Linear(d, d, bias=False, device=device)
        self.ff_norm = nn.RMSNorm(d, device=device)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False, device=device)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False, device=device)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, t, self.n_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotary(q, self.theta), rotary(k, self.theta)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(b, t, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model, device="cpu")
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.RMSNorm(config.d_model, device="cpu")
        if not config.weight_tying:
            self.ff_out = nn.Linear(config.d_model, config.vocab_size, bias=False, device="cpu")

    def forward(self, input_ids: torch.Tensor, attention_bias: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        # As released: a bias is built from the mask and passed down, but attention is called without it.
        x = self.wte(input_ids)
        hidden = []
        for block in self.blocks:
            hidden.append(x)
            x = block(x)
        x = self.ln_f(x)
        hidden.append(x)
        logits = F.linear(x, self.wte.weight) if self.config.weight_tying else self.ff_out(x)
        if self.config.scale_logits:
            logits = logits * self.config.d_model ** -0.5
        return logits, tuple(hidden) if output_hidden_states else None


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)  # as released: no self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.model.wte if self.config.weight_tying else self.model.ff_out

    def tie_weights(self) -> None:  # as released: takes no arguments
        if self.config.weight_tying:
            self.model.ff_out = self.model.wte

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, attention_bias: torch.Tensor | None = None,
                past_key_values: object = None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, cache_position: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        if output_attentions:
            raise ValueError("output_attentions is not supported")
        logits, hidden = self.model(input_ids, attention_bias=attention_bias,
                                    output_hidden_states=bool(output_hidden_states))
        return CausalLMOutputWithPast(logits=logits, hidden_states=hidden)


AutoModel.register(LLaDAConfig, LLaDAModelLM)
