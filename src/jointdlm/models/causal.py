"""The project's small causal LM, used as an independent scorer (NLL, MAUVE features) and as the
autoregressive model of the EDLM and APD baselines. It shares the diffusion model's tokenizer.

Trained with `jointdlm pretrain --objective ar --tokenizer-from DIFFUSION_MODEL_DIR`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .mdlm import BuiltinModel
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


class CausalScorer:
    def __init__(self, model: BuiltinModel) -> None:
        if not model.net.config.causal:
            raise ValueError("the scorer must be a causal model (pretrain --objective ar)")
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_length = model.max_length

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> CausalScorer:
        return cls(BuiltinModel.load(directory, device))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def next_token_logprobs(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, V): entry t is log p(token t+1 | tokens <= t)."""
        return torch.log_softmax(self.model.forward(tokens, attention_mask).logits.float(), dim=-1)

    @torch.no_grad()
    def token_logprobs(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T): log p(token t | tokens < t); 0 at t = 0."""
        lp = self.next_token_logprobs(tokens, attention_mask)
        picked = lp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)

    def encode_texts(self, texts: Sequence[str], with_eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded BOS + text (+ EOS) ids and a mask of the scored positions (everything after BOS)."""
        rows = [[BOS_ID, *self.tokenizer.encode(t), *([EOS_ID] if with_eos else [])][: self.max_length]
                for t in texts]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            scored[i, 1: len(r)] = True
        return tokens.to(self.device), scored.to(self.device)

    def nll(self, texts: Sequence[str], batch_size: int = 128) -> list[float]:
        """Mean negative log-likelihood per token of each text (EOS included), in nats."""
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            tokens, scored = self.encode_texts(texts[start:start + batch_size])
            lp = self.token_logprobs(tokens)
            out.extend((-(lp * scored).sum(-1) / scored.sum(-1).clamp(min=1)).tolist())
        return out

    @torch.no_grad()
    def features(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """(N, d) mean of the last hidden states over each text's tokens: MAUVE features."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens, scored = self.encode_texts(texts[start:start + batch_size])
            hidden = self.model.net.final_norm(self.model.forward(tokens).hidden)
            keep = scored.clone()
            keep[:, 0] = True
            chunks.append((hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))
        return torch.cat(chunks).float().cpu()
