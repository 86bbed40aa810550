"""The built-in masked diffusion LM: a small bidirectional transformer of the LLaDA / Dream family.

RMSNorm, rotary positions, SwiGLU MLP, pre-norm blocks. The same network with `causal=True` is the
project's autoregressive scorer. `BuiltinModel` is its `DiffusionLM` adapter (network + tokenizer + spec),
saved and loaded as a Hugging Face-style directory: config.json, model.safetensors, tokenizer.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..validation import require_finite, require_positive
from .protocol import FamilySpec, ModelOutput
from .tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, BPETokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "jointdlm-mdlm"


@dataclass
class MDLMConfig:
    vocab_size: int
    max_length: int = 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    causal: bool = False

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "max_length", "d_model", "n_layers", "n_heads"))
        require_finite(self, ("rope_theta", "norm_eps"))
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int):
            raise ValueError(f"mlp_hidden must be an integer, got {self.mlp_hidden!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.n_heads} heads of even size")
        if self.mlp_hidden <= 0:
            self.mlp_hidden = 32 * math.ceil(self.d_model * 8 / 3 / 32)
        for name in ("vocab_size", "max_length", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4},
    # Twelve narrow layers: as cheap a pass as 8 layers of width 64, and one ADJUST block is 1/7 of it.
    "deep": {"d_model": 48, "n_layers": 12, "n_heads": 4},
    "small": {"d_model": 128, "n_layers": 4, "n_heads": 4},
    "base": {"d_model": 384, "n_layers": 8, "n_heads": 6},
    "large": {"d_model": 768, "n_layers": 12, "n_heads": 12},
}


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, T, head_dim/2) for integer positions (B, T)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates each pair (x[2i], x[2i+1]) by its angle. As one complex product it gives the numbers of writing out
    x1*cos - x2*sin and x1*sin + x2*cos (to float rounding), about ten times faster on a CPU (no strided halves);
    `benchmarks/exact_speedups.py` times and checks the two."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


SMALL_HEAD_DIM = 16


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention (a boolean mask keeps True): `written_out_attention` on a CPU with heads of at
    most 16 dimensions (the `tiny` and `deep` presets), where torch's fused kernel pays per tiny (batch x head)
    problem; the fused kernel for larger heads, where it is faster, and on GPUs (docs/results.md §6)."""
    if q.device.type != "cpu" or q.shape[-1] > SMALL_HEAD_DIM:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    return written_out_attention(q, k, v, attn_mask, is_causal)


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                          is_causal: bool = False) -> torch.Tensor:
    """The same three products written out (a causal mask aligned top-left, as torch's)."""
    scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill_(~attn_mask, -torch.inf)
    return scores.softmax(-1) @ v


def take_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, M, ...) rows of x (B, T, ...) at the positions `index` (B, M)."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


class Attention(nn.Module):
    """Multi-head self-attention with rotary positions; `qk_norm` normalises queries and keys per head, which
    bounds the attention logits (without it a small network trained fast can saturate its softmax)."""

    def __init__(self, d_model: int, n_heads: int, qk_norm: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        head_dim = d_model // n_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=eps) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn_mask: torch.Tensor | None, causal: bool, cache: KVWindow | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.attend(k, v)
        y = attention(q, k, v, attn_mask, causal and attn_mask is None)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, T', head_dim) of the (normed) inputs x (B, T', d), whose positions' rotary
        tables are cos/sin (B, 1, T', head_dim/2): what `attend` reads."""
        b, t, d = x.shape
        k, v = F.linear(x, self.qkv.weight[d:]).view(b, t, 2, self.n_heads, d // self.n_heads).unbind(2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rotary(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, M, d) outputs for queries from x (B, M, d) only, over given keys and values: queries, output
        projection and whatever follows cost M positions, not the canvas."""
        b, m, d = x.shape
        q = F.linear(x, self.qkv.weight[:d]).view(b, m, self.n_heads, d // self.n_heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        y = attention(apply_rotary(q.transpose(1, 2), cos, sin), keys, values, attn_mask)
        return self.out(y.transpose(1, 2).reshape(b, m, d))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block; also the building block of the ADJUST head."""

    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int, eps: float = 1e-6, qk_norm: bool = False) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=eps)
        self.attn = Attention(d_model, n_heads, qk_norm, eps)
        self.mlp_norm = nn.RMSNorm(d_model, eps=eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                attn_mask: torch.Tensor | None = None, causal: bool = False,
                cache: KVWindow | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, attn_mask, causal, cache)
        return x + self.mlp(self.mlp_norm(x))

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's keys and values of block inputs x (see `Attention.keys_values`)."""
        return self.attn.keys_values(self.attn_norm(x), cos, sin)

    def forward_at(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The block's output for inputs x (B, M, d) at some positions only (rotary tables cos/sin of those
        positions), attending to keys and values of the whole canvas (from `keys_values`)."""
        x = x + self.attn.attend(self.attn_norm(x), cos, sin, keys, values, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class KVWindow:
    """One layer's keys and values of a whole canvas, kept so that a later pass computes only a window of it.

    `record` (the full pass) keeps them; `attend` (a window pass) writes the window's fresh keys and values
    into a copy and returns the whole canvas's, so the window's queries see fresh values for themselves and the
    recorded ones everywhere else. Outside the window they are stale by however much the canvas changed since
    the full pass: an approximation for a bidirectional model (Fast-dLLM's prefix and dual caches).
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.window: slice | None = None
        self.rows: torch.Tensor | None = None

    def attend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.window is None:  # the full pass: record
            self.k, self.v = k, v
            return k, v
        keys, values = self.k[self.rows], self.v[self.rows]  # indexing copies: the record stays as it was
        keys[:, :, self.window], values[:, :, self.window] = k, v
        return keys, values


def real_positions(attention_mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded prompt sees the same positions as an unpadded one."""
    b, t = shape
    if attention_mask is None:
        return torch.arange(t, device=device).expand(b, t)
    return (attention_mask.bool().long().cumsum(-1) - 1).clamp(min=0)


def positions_and_mask(attention_mask: torch.Tensor | None, shape: torch.Size, causal: bool,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`real_positions` and the attention mask: padding is never attended to (causal: nor later positions)."""
    b, t = shape
    positions = real_positions(attention_mask, shape, device)
    if attention_mask is None:
        return positions, None
    keep = attention_mask.bool()
    mask = keep[:, None, None, :].expand(b, 1, t, t)
    if causal:
        mask = mask & torch.ones(t, t, dtype=torch.bool, device=device).tril()
    # A padding query with nothing to attend to would give NaN; let it see itself.
    mask = mask | torch.eye(t, dtype=torch.bool, device=device)
    return positions, mask


class MaskedDiffusionTransformer(nn.Module):
    def __init__(self, config: MDLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, config.mlp_hidden, config.norm_eps) for _ in range(config.n_layers)
        )
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_tables(positions, self.config.d_model // self.config.n_heads, self.config.rope_theta)

    def forward(self, tokens: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits, hidden) where hidden is the last block's output before the final norm."""
        hidden = self.trunk(tokens, attention_mask)
        return self.head(hidden), hidden

    def trunk(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
              record: list[KVWindow] | None = None) -> torch.Tensor:
        """The blocks without the output head: callers that read logits at a few positions apply `head` there.
        `record` (one `KVWindow` per block) keeps every block's keys and values for later window passes."""
        if tokens.shape[1] > self.config.max_length:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_length={self.config.max_length}")
        positions, mask = positions_and_mask(attention_mask, tokens.shape, self.config.causal, tokens.device)
        rope = self.rope(positions)
        x = self.embedding(tokens)
        for i, block in enumerate(self.blocks):
            cache = None
            if record is not None:
                cache = record[i]
                cache.window = None
            x = block(x, rope, mask, self.config.causal, cache)
        return x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.final_norm(hidden))

    def trunk_window(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, window: slice,
                     caches: list[KVWindow], rows: torch.Tensor) -> torch.Tensor:
        """Hidden states of `tokens[:, window]` only, attending over the whole canvas through `caches` (one per
        block, recorded by `trunk(..., record=caches)`); `rows` picks each row of `tokens` in the recorded batch."""
        positions, mask = positions_and_mask(attention_mask, tokens.shape, self.config.causal, tokens.device)
        rope = self.rope(positions[:, window])
        x = self.embedding(tokens[:, window])
        mask = None if mask is None else mask[:, :, window]
        for block, cache in zip(self.blocks, caches, strict=True):
            cache.window, cache.rows = window, rows
            x = block(x, rope, mask, self.config.causal, cache)
        return x

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def builtin_spec(vocab_size: int) -> FamilySpec:
    return FamilySpec(name=MODEL_TYPE, vocab_size=vocab_size, mask_id=MASK_ID, pad_id=PAD_ID,
                      eos_id=EOS_ID, bos_id=BOS_ID, shifted_logits=False)


def weights_fingerprint(config: dict, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state):
        digest.update(name.encode())
        # The raw bytes (numpy has no bfloat16); for float32 the same bytes numpy gave, so fingerprints stand.
        digest.update(state[name].detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_config(path: Path) -> dict:
    """A JSON config file as a dict, with errors that name the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return raw


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, with errors that name it (a truncated download is the usual cause)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} cannot be read ({err}); is the file complete?") from None


def mismatch_detail(err: RuntimeError) -> str:
    """The first specific line of a load_state_dict error (its first line only names the module)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
    return detail if len(detail) <= 300 else detail[:300] + " ..."


def config_from(config_class: type, raw: dict, path: Path, defaults: dict | None = None):
    """A config dataclass from a saved JSON object: a field of the wrong type or range names the file."""
    names = {f.name for f in fields(config_class)}
    try:
        return config_class(**{**(defaults or {}), **{k: v for k, v in raw.items() if k in names}})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} holds a bad setting: {err}") from None


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class BuiltinModel:
    """`DiffusionLM` adapter for the built-in network (or its causal twin, the scorer)."""

    def __init__(self, net: MaskedDiffusionTransformer, tokenizer: BPETokenizer) -> None:
        if tokenizer.vocab_size != net.config.vocab_size:
            raise ValueError("tokenizer and network disagree on the vocabulary size")
        self.net = net
        self.tokenizer = tokenizer
        self.spec = builtin_spec(net.config.vocab_size)
        self.hidden_size = net.config.d_model
        self.max_length = net.config.max_length
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> ModelOutput:
        hidden = self.net.trunk(tokens, attention_mask)
        return ModelOutput(logits=self.net.head(hidden if at is None else hidden[at]), hidden=hidden)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net.embedding(tokens)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net.head(hidden)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net.final_norm(hidden)

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        return self.net.output(normed)

    def windowed(self) -> WindowedPasses:
        """A view whose passes compute one window of the canvas, reusing recorded keys and values elsewhere."""
        return WindowedPasses(self)

    def block_factory(self) -> Block:
        """A fresh block of this family's shape (the ADJUST head is one of these)."""
        c = self.net.config
        return Block(c.d_model, c.n_heads, c.mlp_hidden, c.norm_eps)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.rope(positions)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(asdict(self.net.config), self.net.state_dict())
        return self._fingerprint

    def to(self, device: str | torch.device) -> BuiltinModel:
        self.net.to(device)
        return self

    def eval(self) -> BuiltinModel:
        self.net.eval()
        return self

    def save(self, directory: str | Path, extra_config: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}, str(tmp))
        os.replace(tmp, directory / WEIGHTS_FILE)
        self.tokenizer.save(directory)
        config = {"model_type": MODEL_TYPE, **asdict(self.net.config), **(extra_config or {})}
        atomic_write_json(directory / CONFIG_FILE, config)
        self._fingerprint = None

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> BuiltinModel:
        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{directory} is not a model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        raw = read_config(directory / CONFIG_FILE)
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{directory} holds model_type={raw.get('model_type')!r}, not {MODEL_TYPE!r}")
        net = MaskedDiffusionTransformer(config_from(MDLMConfig, raw, directory / CONFIG_FILE))
        try:
            net.load_state_dict(read_weights(directory / WEIGHTS_FILE))
        except RuntimeError as err:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not match {directory / CONFIG_FILE}: "
                             f"{mismatch_detail(err)}") from None
        net.requires_grad_(False)
        return cls(net, BPETokenizer.load(directory)).to(device).eval()


class WindowedPasses:
    """A `DiffusionLM` view of a built-in model for semi-autoregressive sampling with a key-value cache.

    `record` runs one full pass over the canvas, keeping every block's keys and values and its hidden states,
    and the window (the current block; or the block and everything after it) that later passes compute. Until
    the next `record`, a pass computes only the window's positions, attending over the whole canvas with
    recorded keys and values outside it; positions outside the window keep their recorded hidden states, and
    logits come from the hidden states at the positions a caller asks for. The loop changes tokens only inside
    the window between records, so what is recorded outside it is stale only through attention (the
    approximation Fast-dLLM makes). The first pass after a record, on the same tokens, returns the recorded
    hidden states themselves. A probe of some of the rows (PUNT's, through `subset`) computes the window on those
    rows' record like any pass; a batch of another size than the view's rows gets an exact full pass.
    """

    def __init__(self, model: BuiltinModel) -> None:
        self.model = model
        self.spec, self.tokenizer = model.spec, model.tokenizer
        self.hidden_size, self.max_length = model.hidden_size, model.max_length
        self.caches = [KVWindow() for _ in model.net.blocks]
        self.window: slice | None = None
        self.rows: torch.Tensor | None = None  # None: every recorded row
        self._tokens = self._hidden = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def record(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, window: slice) -> None:
        net = self.model.net
        self._hidden = net.trunk(tokens, attention_mask, record=self.caches)
        self._tokens = tokens.clone()
        self.window, self.rows = window, None

    def select(self, rows: torch.Tensor) -> WindowedPasses:
        """A view of some recorded rows (indices into the recorded batch): the rows still sampling."""
        view = copy.copy(self)
        view.rows = rows
        return view

    def subset(self, rows: torch.Tensor) -> WindowedPasses:
        """A view of some of this view's rows (a sampler's probe of a few rows)."""
        return self.select(self._rows()[rows])

    def _rows(self) -> torch.Tensor:
        return self.rows if self.rows is not None else torch.arange(self._tokens.shape[0], device=self.device)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> ModelOutput:
        rows = self._rows()
        if self.window is None or tokens.shape[0] != rows.numel():
            return self.model.forward(tokens, attention_mask, at)
        net = self.model.net
        hidden = self._hidden[rows]  # indexing copies: the record stays as it was
        if not torch.equal(tokens, self._tokens[rows]):
            hidden[:, self.window] = net.trunk_window(tokens, attention_mask, self.window, self.caches, rows)
        return ModelOutput(logits=net.head(hidden if at is None else hidden[at]), hidden=hidden)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed(tokens)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.normed(hidden)

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        return self.model.unembed(normed)

    def block_factory(self) -> Block:
        return self.model.block_factory()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rope(positions)

    def fingerprint(self) -> str:
        return self.model.fingerprint()
