"""Stand-in for LLaDA's released configuration (see ../README.md)."""

from transformers import AutoConfig, PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, d_model: int = 32, n_heads: int = 4, n_layers: int = 2, mlp_hidden_size: int = 64,
                 vocab_size: int = 300, max_sequence_length: int = 64, rope_theta: float = 10000.0,
                 weight_tying: bool = False, scale_logits: bool = False, mask_token_id: int | None = None,
                 use_cache: bool = False, **kwargs) -> None:
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.weight_tying = weight_tying
        self.scale_logits = scale_logits
        self.mask_token_id = mask_token_id
        kwargs.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(use_cache=use_cache, **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers


AutoConfig.register("llada", LLaDAConfig)
