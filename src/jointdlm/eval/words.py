"""A cheap, exact quality signal for real text from small models: how many generated words exist.

Naive parallel decoding glues sub-word pieces from different words into non-words ("flakesating"); the
share of generated words that occur anywhere in the training corpus measures that failure directly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD = re.compile(r"[A-Za-z]+")


def corpus_words(documents: Iterable[str]) -> set[str]:
    return {w.lower() for doc in documents for w in WORD.findall(doc)}


def known_word_rate(texts: Iterable[str], vocabulary: set[str]) -> float:
    """Share of generated words found in the corpus vocabulary (0 if nothing was generated)."""
    words = [w.lower() for text in texts for w in WORD.findall(text)]
    return sum(w in vocabulary for w in words) / len(words) if words else 0.0
