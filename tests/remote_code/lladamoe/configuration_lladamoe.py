"""Stand-in for LLaDA-MoE's released configuration (see ../README.md): the class is called LLaDAConfig and its
model_type is "llada", as for the dense LLaDA; no mask id is declared."""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, vocab_size: int = 300, hidden_size: int = 32, expert_intermediate_size: int = 32,
                 num_hidden_layers: int = 2, num_attention_heads: int = 4, num_experts: int = 4,
                 num_experts_per_tok: int = 2, max_position_embeddings: int = 64, rms_norm_eps: float = 1e-5,
                 rope_theta: float = 50000.0, rope_scaling: dict | None = None, partial_rotary_factor: float = 1.0,
                 tie_word_embeddings: bool = False, use_cache: bool = False, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.expert_intermediate_size = expert_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.partial_rotary_factor = partial_rotary_factor
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
