"""The ADJUST head: one transformer block on top of a frozen base that updates the base's marginals
after tokens are written, so K tokens per base pass approximately follow the joint.

    z  = proj(concat(RMSNorm(E(x)), RMSNorm(h)))      E: the base's frozen embedding of the current tokens
    z  = Block(z)                                     one bidirectional block of the base family, QK-normed
    u  = RMSNorm(z)                                   its gain starts at zero
    h' = h + rms(h) * u                               the update in units of the hidden state's own size
    logits = base.lm_head(h')                         the frozen base head

A pass computes the block's queries (and all that follows them) only at the positions still masked, with keys
and values over the whole canvas; written positions keep their hidden state. Nobody reads a written position's
output, so a pass costs about the masked positions, not the canvas (on `large` with half the canvas masked, 0.71
of the full block's time; with a tenth masked, 0.41: docs/results.md §6).

Two choices make it learn on any base (docs/results.md §2):
* The update is scaled by the (per-position) size of the hidden state. A base's last hidden state can be
  large (RMS 13, norms up to 1100 on our `small` bases, before the final norm); an update of unit size is then
  a rounding error, and the head needed thousands of steps before its output mattered at all.
* Queries and keys are RMS-normalised per attention head. Without it, the head's attention logits grew to the
  hundreds during training and the softmax saturated: the output at a position no longer depended on the token
  just written next to it, which is exactly the dependency the head exists to carry.
The output factor starts at zero, so an untrained head returns h unchanged: exactly naive parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..models.mdlm import Block, positions_and_mask, read_config, read_weights, rotary_tables, take_positions
from ..models.protocol import DiffusionLM

HEAD_CONFIG_FILE = "adjust_config.json"
HEAD_WEIGHTS_FILE = "adjust.safetensors"


@dataclass(frozen=True)
class AdjustHeadConfig:
    d_model: int
    n_heads: int
    mlp_hidden: int
    base_fingerprint: str
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    hidden_scale: bool = False
    """Whether the update is scaled by the hidden state's own size (every head trained since docs/results.md §2;
    False only in heads saved before)."""
    qk_norm: bool = False
    """Whether the block normalises queries and keys (likewise)."""
    masked_only: bool = False
    """Whether a pass updates only the positions still masked (queries there, keys and values over the whole
    canvas); written positions keep their hidden state. Heads saved before this field existed update every position."""

    @classmethod
    def for_base(cls, base: DiffusionLM) -> AdjustHeadConfig:
        """One block of the base's own shape: from `base.block_shape()` where the base offers it (Hugging Face
        adapters), else from the built-in network's config."""
        if hasattr(base, "block_shape"):
            d_model, n_heads, mlp_hidden, theta = base.block_shape()
        else:
            net_config = getattr(getattr(base, "net", None), "config", None)
            d_model = base.hidden_size
            n_heads = getattr(net_config, "n_heads", max(1, base.hidden_size // 64))
            mlp_hidden = getattr(net_config, "mlp_hidden", 4 * base.hidden_size)
            theta = getattr(net_config, "rope_theta", 10000.0)
        return cls(d_model=d_model, n_heads=n_heads, mlp_hidden=mlp_hidden,
                   base_fingerprint=base.fingerprint(), rope_theta=theta,
                   hidden_scale=True, qk_norm=True, masked_only=True)


class AdjustHead(nn.Module):
    def __init__(self, config: AdjustHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.threshold_share: float | None = None
        """The training's `threshold_share` when known (None: not trained by train_adjust, or not recorded)."""
        d = config.d_model
        self.embed_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.hidden_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(d, config.n_heads, config.mlp_hidden, config.norm_eps, qk_norm=config.qk_norm)
        self.out_norm = nn.RMSNorm(d, eps=config.norm_eps)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.out_norm.weight)

    def forward(self, base: DiffusionLM, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
                hidden: torch.Tensor, at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One cheap pass: (current tokens, previous hidden) -> (new hidden, logits), the logits (N, V) at the
        True positions of `at` when given (as the base's forward)."""
        new_hidden = self.update(base, tokens, attention_mask, hidden)
        return new_hidden, base.lm_head(new_hidden if at is None else new_hidden[at])

    def update(self, base: DiffusionLM, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
               hidden: torch.Tensor) -> torch.Tensor:
        """The new hidden states alone (passes whose logits nobody reads skip the output projection)."""
        embedded = base.embed(tokens)
        z = self.proj(torch.cat([self.embed_norm(embedded), self.hidden_norm(hidden)], dim=-1))
        positions, mask = positions_and_mask(attention_mask, tokens.shape, False, tokens.device)
        rope = rotary_tables(positions, self.config.d_model // self.config.n_heads, self.config.rope_theta)
        if not self.config.masked_only:
            return self._scaled(self.out_norm(self.block(z, rope, mask)), hidden) + hidden
        masked = tokens == base.spec.mask_id
        counts = masked.sum(-1)
        width = int(counts.max())
        if width == 0:
            return hidden
        # Each row's masked positions first, in order; rows with fewer are padded with positions whose output is
        # dropped, so masked_scatter below reads the kept outputs in the row-major order of `masked`.
        index = torch.argsort((~masked).to(torch.uint8), dim=-1, stable=True)[:, :width]
        kept = torch.arange(width, device=tokens.device) < counts[:, None]
        old = take_positions(hidden, index)
        new = old + self._scaled(self.out_norm(self.block.forward_at(z, rope, mask, index)), old)
        return hidden.masked_scatter(masked[..., None], new[kept])

    def _scaled(self, update: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.hidden_scale:
            return update * hidden.detach().pow(2).mean(-1, keepdim=True).sqrt()
        return update

    def fingerprint(self) -> str:
        """A hash of the config and weights (names the head that drove an on-policy collection)."""
        digest = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (HEAD_WEIGHTS_FILE + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, directory / HEAD_WEIGHTS_FILE)
        tmp = directory / (HEAD_CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps({**asdict(self.config), **(extra or {})}, indent=2, sort_keys=True))
        os.replace(tmp, directory / HEAD_CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base: DiffusionLM) -> AdjustHead:
        directory = Path(directory)
        if not (directory / HEAD_CONFIG_FILE).exists() or not (directory / HEAD_WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{directory} is not an ADJUST head directory "
                                    f"(needs {HEAD_CONFIG_FILE} and {HEAD_WEIGHTS_FILE})")
        raw = read_config(directory / HEAD_CONFIG_FILE)
        if raw.get("output_layer", "gain") != "gain":
            raise ValueError(f"{directory} was trained with the removed output layer {raw['output_layer']!r} "
                             "(the hidden-scaled gain replaced it; docs/results.md §2): train it again")
        names = AdjustHeadConfig.__dataclass_fields__
        config = AdjustHeadConfig(**{k: v for k, v in raw.items() if k in names})
        if config.base_fingerprint != base.fingerprint():
            raise ValueError(f"the ADJUST head in {directory} was trained on base {config.base_fingerprint}, "
                             f"but this base model is {base.fingerprint()}; train a head for this base")
        head = cls(config)
        try:
            head.load_state_dict(read_weights(directory / HEAD_WEIGHTS_FILE))
        except RuntimeError as err:
            raise ValueError(f"{directory / HEAD_WEIGHTS_FILE} does not match its config: "
                             f"{str(err).splitlines()[0]}") from None
        training = raw.get("training")
        if isinstance(training, dict):
            head.threshold_share = float(training.get("threshold_share", 0.0))  # older heads trained without
        return head.to(base.device).eval().requires_grad_(False)
