"""The ADJUST head: one transformer block on top of a frozen base that updates the base's marginals
after tokens are written, so K tokens per base pass approximately follow the joint.

    z  = proj(concat(RMSNorm(E(x)), RMSNorm(h)))      E: the base's frozen embedding of the current tokens
    z  = Block(z)                                     one bidirectional block of the base family, QK-normed
    h' = h + rms(h) * RMSNorm(z)                      the update in units of the hidden state's own size
    n  = normed(h')                                   the base's final norm
    n' = n + rms(n) * RMSNorm'(z)                     a second update after it, where the logits are linear
    logits = base.unembed(n')                         the base's frozen output projection

Every pass of a step starts from the base pass's hidden states h (`from_base_hidden`), the tokens written so far
coming in through E(x): the published head instead starts each pass from the previous pass's h', so K-1 passes
stack K-1 updates, and a head trained to depth 3 drifted at the depths K=8 reaches (docs/results.md §2).

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

Why two updates: the final norm divides out any change of the state's size, so the first update can turn the
prediction but not sharpen it. On template's one-base-pass canvases heads without the second put 1.1-1.5x the base's
probability on another subject's words, and wrote 0.969 valid strings against K=1's 0.977 (docs/results.md §2).
The second update's gain gets no gradient until round 1 of `train_adjust` (the first on the head's own rollouts):
trained from the start, one choice head seed of two stuck (validity 0.64-0.81 where the first update alone keeps
0.98); frozen through round 0, four head seeds on choice and permutation learned, and template's one-pass row was
0.974-0.975 at 12,000 samples (docs/results.md §2, "The update after the final norm from round 1"; 0.979 since
training covers depths 1-10, "Depths 1 to 10"). Heads saved with only the first update (before 2026-12-06, and on
its afternoon) load and sample as trained.
The output gains start at zero, so an untrained head returns the base's logits unchanged: exactly naive parallel.
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

from ..models.mdlm import (
    Block,
    config_from,
    mismatch_detail,
    positions_and_mask,
    read_config,
    read_weights,
    real_positions,
    rotary_tables,
    take_positions,
)
from ..models.protocol import DiffusionLM

HEAD_CONFIG_FILE = "adjust_config.json"
HEAD_WEIGHTS_FILE = "adjust.safetensors"
SAVED_BEFORE_FIELDS = {"after_norm": False, "hidden_scale": False, "qk_norm": False, "masked_only": False,
                       "from_base_hidden": False}
"""What a saved head's config means by leaving out a field added later: the behaviour of heads saved before it."""


@dataclass(frozen=True)
class AdjustHeadConfig:
    d_model: int
    n_heads: int
    mlp_hidden: int
    base_fingerprint: str
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    hidden_scale: bool = True
    """Whether the update is scaled by the hidden state's own size (every head trained since docs/results.md §2;
    heads saved before load with False)."""
    qk_norm: bool = True
    """Whether the block normalises queries and keys (likewise)."""
    masked_only: bool = True
    """Whether a pass updates only the positions still masked (queries there, keys and values over the whole
    canvas); written positions keep their hidden state. Heads saved before this field existed update every position."""
    from_base_hidden: bool = True
    """Whether every pass of a step starts from the base pass's hidden states (the tokens written so far come in
    through their embeddings), instead of from the previous pass's output. Heads saved before this field existed
    chain their passes."""
    after_norm: bool = True
    """Whether the second update, after the base's final norm (`base.normed`), is there (see the module docstring).
    Heads saved without the field have only the first update. Needs `from_base_hidden`: a chained pass starts from
    the previous pass's output, which must stay a hidden state of the base."""

    def __post_init__(self) -> None:
        if self.after_norm and not self.from_base_hidden:
            raise ValueError("after_norm needs from_base_hidden (a chained pass starts from the previous pass's "
                             "output, which must stay a hidden state of the base)")

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
                   base_fingerprint=base.fingerprint(), rope_theta=theta)


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
        self.after_norm = None
        if config.after_norm:
            self.after_norm = nn.RMSNorm(d, eps=config.norm_eps)
            nn.init.zeros_(self.after_norm.weight)

    def pass_input(self, base_hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The hidden states a pass starts from: the step's base pass's, or the previous pass's output."""
        return base_hidden if self.config.from_base_hidden else previous

    def forward(self, base: DiffusionLM, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
                hidden: torch.Tensor, at: torch.Tensor | None = None,
                carry: HeadCarry | None = None, query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One cheap pass: (current tokens, the hidden states it starts from: `pass_input`) -> (new hidden,
        logits), the logits (N, V) at the True positions of `at` when given (as the base's forward). `query`
        narrows the positions updated (default: every masked one). `carry` (one per step) keeps the block's keys
        and values from the step's previous pass (see `HeadCarry`)."""
        new_hidden = self.update(base, tokens, attention_mask, hidden, carry, query)
        return new_hidden, self.logits(base, new_hidden if at is None else new_hidden[at])

    def logits(self, base: DiffusionLM, updated: torch.Tensor) -> torch.Tensor:
        """The logits of states this head updated (its passes' output at the positions they updated)."""
        return base.unembed(updated) if self.config.after_norm else base.lm_head(updated)

    def _unchanged(self, base: DiffusionLM, hidden: torch.Tensor) -> torch.Tensor:
        """What `logits` reads where a pass updates nothing."""
        return hidden if self.after_norm is None else base.normed(hidden)

    def _updated(self, base: DiffusionLM, old: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The states after a pass from the hidden states `old` and the block's output `out` there: what
        `logits` reads."""
        new = old + self._scaled(self.out_norm(out), old)
        if self.after_norm is None:
            return new
        normed = base.normed(new)
        return normed + self._scaled(self.after_norm(out), normed)

    def update(self, base: DiffusionLM, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
               hidden: torch.Tensor, carry: HeadCarry | None = None,
               query: torch.Tensor | None = None) -> torch.Tensor:
        """The new states alone (passes whose logits nobody reads skip the output projection): what `logits` reads,
        at every position (with `after_norm`, where nothing was updated, the base's normed states)."""
        positions, mask = positions_and_mask(attention_mask, tokens.shape, False, tokens.device)
        head_dim = self.config.d_model // self.config.n_heads
        if not self.config.masked_only:
            z = self._block_input(base, tokens, hidden)
            rope = rotary_tables(positions, head_dim, self.config.rope_theta)
            return self._updated(base, hidden, self.block(z, rope, mask))
        masked = tokens == base.spec.mask_id
        if query is not None:
            masked = masked & query
        if not masked.any():
            return self._unchanged(base, hidden)
        # Keys and values are needed over the whole canvas, but within a step a written position's token and
        # hidden state stay as they were (only masked positions are updated), so its keys and values from the
        # step's previous pass still hold: recompute them at the masked positions and the ones written since.
        fresh = carry.fresh(tokens, hidden, masked) if carry is not None else None
        if fresh is None:
            fresh_index = None
            z = self._block_input(base, tokens, hidden)
            keys, values = self.block.keys_values(z, *rotary_tables(positions, head_dim, self.config.rope_theta))
        else:
            fresh_index, fresh_kept = _rows_first(fresh)
            z = self._block_input(base, take_positions(tokens, fresh_index), take_positions(hidden, fresh_index))
            k, v = self.block.keys_values(z, *rotary_tables(take_positions(positions, fresh_index), head_dim,
                                                            self.config.rope_theta))
            keys, values = carry.write(fresh_index, fresh_kept, k, v)
        index, kept = _rows_first(masked)
        # The block's input at the masked positions: z's columns follow fresh_index, where masked positions
        # are among the fresh ones, in order.
        z_at = take_positions(z, index if fresh_index is None else
                              take_positions(fresh.long().cumsum(-1).sub(1).clamp(min=0), index))
        if mask is not None:  # (B, 1, T, T): the rows of the queried positions
            b, t = tokens.shape
            mask = take_positions(mask.expand(b, 1, t, t).transpose(1, 2), index).transpose(1, 2)
        cos, sin = rotary_tables(take_positions(positions, index), head_dim, self.config.rope_theta)
        new = self._updated(base, take_positions(hidden, index),
                            self.block.forward_at(z_at, cos, sin, keys, values, mask))
        new_hidden = self._unchanged(base, hidden).masked_scatter(masked[..., None], new[kept])
        if carry is not None:  # the hidden state the next pass will start from
            carry.remember(tokens, hidden if self.config.from_base_hidden else new_hidden, keys, values)
        return new_hidden

    def step_passes(self, base: DiffusionLM, attention_mask: torch.Tensor | None, base_hidden: torch.Tensor,
                    index: torch.Tensor) -> StepPasses:
        """The head's passes of one sampling step at the candidates `index` (B, C): see `StepPasses`."""
        return StepPasses(self, base, attention_mask, base_hidden, index)

    def _block_input(self, base: DiffusionLM, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([self.embed_norm(base.embed(tokens)), self.hidden_norm(hidden)], dim=-1))

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
        config = config_from(AdjustHeadConfig, raw, directory / HEAD_CONFIG_FILE, SAVED_BEFORE_FIELDS)
        if config.base_fingerprint != base.fingerprint():
            raise ValueError(f"the ADJUST head in {directory} was trained on base {config.base_fingerprint}, "
                             f"but this base model is {base.fingerprint()}; train a head for this base")
        head = cls(config)
        try:
            head.load_state_dict(read_weights(directory / HEAD_WEIGHTS_FILE))
        except RuntimeError as err:
            raise ValueError(f"{directory / HEAD_WEIGHTS_FILE} does not match its config: "
                             f"{mismatch_detail(err)}") from None
        training = raw.get("training")
        if isinstance(training, dict):
            head.threshold_share = float(training.get("threshold_share", 0.0))  # older heads trained without
        return head.to(base.device).eval().requires_grad_(False)


class StepPasses:
    """The head's passes of one sampling step, at the step's candidate positions `index` (B, C): each `logits`
    call is one pass and returns logits (B, C, V) there; `keep` narrows the candidates.

    No shape depends on the data (the caller masks out candidates it may not choose), so a pass reads nothing back
    from the device, and it launches less than half the operations of the general pass: on a GPU the launches are
    what a head pass costs (docs/results.md §6). For a head whose
    passes start from the base's hidden states and update masked positions only (the default recipe), the block's
    input at a position changes only when its token does, so after the step's first pass a pass computes keys and
    values at the one position each row wrote since. Other heads (saved before 2026-12-03) take the general pass.
    """

    def __init__(self, head: AdjustHead, base: DiffusionLM, attention_mask: torch.Tensor | None,
                 base_hidden: torch.Tensor, index: torch.Tensor) -> None:
        self.head, self.base, self.attention_mask, self.base_hidden, self.index = \
            head, base, attention_mask, base_hidden, index
        self.fixed = head.config.from_base_hidden and head.config.masked_only
        self.hidden = base_hidden
        self.carry = HeadCarry()
        self.keys: torch.Tensor | None = None

    @property
    def can_select(self) -> bool:
        """Whether `select` may narrow the rows (today's heads, after the step's first pass)."""
        return self.fixed and self.keys is not None

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only the batch rows `rows` (R,): later passes compute those rows alone."""
        for name in ("attention_mask", "base_hidden", "index", "keys", "values", "positions", "z", "z_at",
                     "hidden_at", "mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[rows])
        self.hidden = self.base_hidden  # what the fixed path holds there (it reads it nowhere after the first pass)
        self.rope = tuple(t[rows] for t in self.rope)
        self.rope_at = tuple(t[rows] for t in self.rope_at)

    def keep(self, columns: torch.Tensor) -> None:
        """Keeps only the candidates at `columns` (B, C') of each row, e.g. all but the one just written: a pass
        then costs the candidates still to be chosen among."""
        self.index = self.index.gather(1, columns)
        if self.keys is not None:
            self.z_at, self.hidden_at = take_positions(self.z_at, columns), take_positions(self.hidden_at, columns)
            self.rope_at = tuple(t.gather(2, columns[:, None, :, None].expand(-1, 1, -1, t.shape[-1]))
                                 for t in self.rope_at)

    def replace(self, column: torch.Tensor, position: torch.Tensor) -> None:
        """Puts candidate `position` (B,) in the place of column `column` (B,) of each row (the candidate just
        written leaves, the next one in the base's ranking comes in): a pass keeps costing the same few candidates.
        Only after the step's first pass."""
        self.index = self.index.scatter(1, column[:, None], position[:, None])
        if self.keys is not None:
            at, col = position[:, None], column[:, None]
            for name, full in (("z_at", self.z), ("hidden_at", self.base_hidden)):
                setattr(self, name, getattr(self, name).scatter(
                    1, col[..., None].expand(-1, -1, full.shape[-1]), take_positions(full, at)))
            self.rope_at = tuple(t.scatter(2, col[:, None, :, None].expand(-1, 1, -1, t.shape[-1]),
                                           f.gather(2, at[:, None, :, None].expand(-1, 1, -1, f.shape[-1])))
                                 for t, f in zip(self.rope_at, self.rope, strict=True))

    def logits(self, tokens: torch.Tensor, written: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, V) logits at the candidates after one pass over `tokens`; `written` (B,) is a position each row
        wrote since the previous call (any position for a row that wrote nothing): required after the first."""
        head, index = self.head, self.index
        if not self.fixed:
            query = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, index, True)
            self.hidden = head.update(self.base, tokens, self.attention_mask,
                                      head.pass_input(self.base_hidden, self.hidden), self.carry, query)
            return head.logits(self.base, take_positions(self.hidden, index))
        head_dim = head.config.d_model // head.config.n_heads
        if self.keys is None:
            positions = real_positions(self.attention_mask, tokens.shape, tokens.device)
            z = head._block_input(self.base, tokens, self.base_hidden)
            self.rope = rotary_tables(positions, head_dim, head.config.rope_theta)
            self.keys, self.values = head.block.keys_values(z, *self.rope)
            self.positions, self.z = positions, z
            self.z_at = take_positions(z, index)
            self.rope_at = rotary_tables(take_positions(positions, index), head_dim, head.config.rope_theta)
            self.hidden_at = take_positions(self.base_hidden, index)
            # A candidate is a real token, so it sees every non-padding position (itself among them).
            self.mask = None if self.attention_mask is None else self.attention_mask.bool()[:, None, None, :]
        else:
            at = written[:, None]
            z = head._block_input(self.base, take_positions(tokens, at), take_positions(self.base_hidden, at))
            k, v = head.block.keys_values(z, *rotary_tables(take_positions(self.positions, at), head_dim,
                                                            head.config.rope_theta))
            where = at[:, None, :, None].expand_as(k)
            self.keys.scatter_(2, where, k)
            self.values.scatter_(2, where, v)
        out = head.block.forward_at(self.z_at, *self.rope_at, self.keys, self.values, self.mask)
        return head.logits(self.base, head._updated(self.base, self.hidden_at, out))


def _rows_first(where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) each row's True positions first, in order, W the most in any row (rows with fewer are padded
    with other positions), and (B, W) which of them are real; masked_scatter reads `new[kept]` in the
    row-major order of `where`."""
    counts = where.sum(-1)
    width = int(counts.max())
    index = torch.argsort((~where).to(torch.uint8), dim=-1, stable=True)[:, :width]
    return index, torch.arange(width, device=where.device) < counts[:, None]


class HeadCarry:
    """The head block's keys and values from the previous pass of the same step, to pass to every general head
    pass of one step (a new one each step: the base pass changes every hidden state). The sampler's `StepPasses`
    uses it for heads saved before 2026-12-03; for today's heads it recomputes even less.

    A position that was written before the previous pass has the same token and, since a pass updates only
    masked positions, the same hidden state: its keys and values are what that pass computed. On `large` with
    half the canvas written this saves the input projection and the keys and values at half the positions in
    every pass after the step's first (docs/results.md §6). The result is the same computation as without it.
    (A head whose passes all start from the base's hidden states has the same input everywhere but at the
    positions written since.)
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def fresh(self, tokens: torch.Tensor, hidden: torch.Tensor, masked: torch.Tensor) -> torch.Tensor | None:
        """(B, T) where keys and values must be computed anew; None for everywhere (the step's first pass, or a
        hidden state that is not the one remembered)."""
        if (self.keys is None or hidden is not self.hidden or tokens.shape != self.tokens.shape
                or torch.is_grad_enabled()):  # written in place: inference only
            return None
        return masked | (tokens != self.tokens)

    def write(self, index: torch.Tensor, kept: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole canvas's keys and values with the fresh ones (B, H, W, head_dim, at `index`) written in;
        padding columns keep the old ones."""
        where = index[:, None, :, None].expand_as(keys)
        keep = kept[:, None, :, None]
        for old, new in ((self.keys, keys), (self.values, values)):
            old.scatter_(2, where, torch.where(keep, new, old.gather(2, where)))
        return self.keys, self.values

    def remember(self, tokens: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.tokens, self.hidden, self.keys, self.values = tokens.clone(), hidden, keys, values
