"""Stand-in for RND1's released configuration (see ../README.md): model_type "rnd1", the mask id kept in the config
(151669 unless given), and `rope_scaling` set to False after the base class's init and before `rope_theta`, which
under transformers 5 leaves `rope_parameters` False: transformers' Qwen3 rotary module, which the model builds,
then fails."""

from transformers import PretrainedConfig


class RND1Config(PretrainedConfig):
    model_type = "rnd1"

    def __init__(self, vocab_size: int = 300, hidden_size: int = 32, head_dim: int = 8, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, moe_intermediate_size: int = 32,
                 num_experts: int = 4, num_experts_per_tok: int = 2, max_position_embeddings: int = 64,
                 rms_norm_eps: float = 1e-6, rope_theta: float = 1000000.0, mask_token_id: int = 151669,
                 tie_word_embeddings: bool = False, **kwargs) -> None:
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        # In the released order (its defaults table lists rope_scaling before rope_theta): under transformers 5,
        # assigning rope_scaling standardises rotary settings at once, finds no rope_theta yet, and leaves
        # rope_parameters False.
        self.rope_scaling = False
        self.rope_theta = rope_theta
        self.attention_dropout = 0.0
        self.mask_token_id = mask_token_id
        self.use_cache = False
