"""Stand-in for Dream's released configuration (see ../README.md)."""

from transformers import PretrainedConfig
from transformers.modeling_rope_utils import rope_config_validation


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(self, vocab_size: int = 300, hidden_size: int = 32, intermediate_size: int = 64,
                 num_hidden_layers: int = 2, num_attention_heads: int = 4, max_position_embeddings: int = 64,
                 rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                 tie_word_embeddings: bool = False, use_cache: bool = False, mask_token_id: int | None = None,
                 pad_token_id: int | None = None, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.use_cache = use_cache
        rope_config_validation(self)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
