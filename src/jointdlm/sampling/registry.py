"""Samplers by name: adding a sampler is adding its module and one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .adjust import AdjustSampler
from .apd import APDSampler
from .base import Sampler
from .eb import EBSampler
from .edlm import EDLMSampler
from .parallel import ParallelSampler
from .punt import PUNTSampler
from .sequential import SequentialSampler
from .threshold import ThresholdSampler

SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "sequential": SequentialSampler,
    "parallel": ParallelSampler,
    "adjust": AdjustSampler,
    "threshold": ThresholdSampler,
    "eb": EBSampler,
    "punt": PUNTSampler,
    "edlm": EDLMSampler,
    "apd": APDSampler,
}


def make_sampler(name: str, **options: Any) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](**options)
