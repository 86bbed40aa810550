"""Byte-level BPE tokenizer trained on the corpus (Hugging Face `tokenizers`).

Byte-level pre-tokenisation makes every UTF-8 string encodable and the text round trip exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>")
PAD_ID, BOS_ID, EOS_ID, MASK_ID = range(4)
TOKENIZER_FILE = "tokenizer.json"


class BPETokenizer:
    """Thin wrapper that keeps special ids fixed (0..3) and never emits them from `encode`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        for i, name in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(name) != i:
                raise ValueError(f"tokenizer must map {name} to id {i}")
        tokenizer.encode_special_tokens = True  # "<mask>" typed in text is text, never the special id
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, directory: str | Path) -> BPETokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            raise ValueError(f"{path} is not a valid tokenizer file ({err})") from None

    def save(self, directory: str | Path) -> None:
        self._tok.save(str(Path(directory) / TOKENIZER_FILE))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode, dropping special tokens (a mask left in a canvas decodes to nothing)."""
        return self._tok.decode([int(i) for i in ids if int(i) >= len(SPECIAL_TOKENS)], skip_special_tokens=False)

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """One readable piece per id, for showing a canvas token by token."""
        return [self._tok.decode([int(i)]) if int(i) >= len(SPECIAL_TOKENS) else SPECIAL_TOKENS[int(i)]
                for i in ids]
