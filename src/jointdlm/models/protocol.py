"""The one interface every base model offers to samplers and trainers.

Family quirks (where the mask id lives, whether the network's output at i-1 predicts token i) are
resolved inside the adapter: everything that crosses this boundary is aligned so that position i
describes token i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class FamilySpec:
    """Special token ids and layout facts of one model family."""

    name: str
    vocab_size: int
    mask_id: int
    pad_id: int
    eos_id: int
    bos_id: int | None = None
    shifted_logits: bool = False

    def __post_init__(self) -> None:
        ids = {"mask_id": self.mask_id, "pad_id": self.pad_id, "eos_id": self.eos_id}
        if self.bos_id is not None:
            ids["bos_id"] = self.bos_id
        for key, value in ids.items():
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{key}={value} is outside the vocabulary (size {self.vocab_size})")

    def never_sampled(self) -> list[int]:
        """Ids a sampler must never write into a masked position."""
        banned = [self.mask_id]
        if self.bos_id is not None and self.bos_id not in (self.eos_id, self.pad_id):
            banned.append(self.bos_id)
        return banned


@dataclass
class ModelOutput:
    """Logits (B, T, V), or (N, V) at the positions a caller asked for, and last hidden states (B, T, d),
    position i describing token i."""

    logits: torch.Tensor
    hidden: torch.Tensor


@runtime_checkable
class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class DiffusionLM(Protocol):
    """A masked diffusion LM as samplers and the ADJUST trainer see it."""

    spec: FamilySpec
    tokenizer: TextTokenizer
    hidden_size: int
    max_length: int

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> ModelOutput:
        """One full base pass over (B, T) token ids; attention_mask marks real (non-padding) tokens. With `at`, a
        (B, T) boolean mask, logits are (N, V) for its True positions in row-major order (callers that read a
        few positions skip the output projection elsewhere); hidden is always (B, T, d)."""
        ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The frozen input token embedding, (B, T) -> (B, T, d)."""
        ...

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen output head applied to aligned hidden states, (B, T, d) -> (B, T, V):
        `unembed(normed(hidden))`."""
        ...

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head's normalisation of hidden states (the final norm; the identity where the hidden states
        come normalised, as LLaDA's and Dream's do), (B, T, d) -> (B, T, d)."""
        ...

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        """The output head after its normalisation: logits linear in `normed`, (B, T, d) -> (B, T, V)."""
        ...

    def fingerprint(self) -> str:
        """A hash of architecture and weights, so that trained add-ons refuse a different base."""
        ...

    @property
    def device(self) -> torch.device: ...
