"""Samplers by name: adding a sampler is adding its module and one line here."""

from __future__ import annotations

import dataclasses
import math
import typing
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


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if not math.isfinite(value):
            raise ValueError(f"sampler option value {text!r} is not a finite number")
        return value
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`name[:key=value[:key=value...]]`, e.g. `punt:epsilon=0.05` or `threshold:tau=0.8`."""
    name, *pairs = spec.strip().split(":")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(sorted(SAMPLERS))}")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad sampler option {pair!r} in {spec!r}; write key=value")
        key = key.replace("-", "_")
        if key in options:
            raise ValueError(f"sampler option {key!r} is given twice in {spec!r}; give it once")
        options[key] = _value(value)
    return name, options


def dependencies_of(spec: str) -> tuple[str, ...]:
    """What a spec's sampler needs besides the model: "head" (an ADJUST head: adjust, punt:via=adjust) or
    "scorer" (a causal scorer: edlm, apd)."""
    name, options = parse_spec(spec)
    if name == "punt" and options.get("via") == "adjust":
        return ("head",)
    return {"adjust": ("head",), "edlm": ("scorer",), "apd": ("scorer",)}.get(name, ())


def make_from_spec(spec: str, **dependencies: Any) -> Sampler:
    """A sampler from its spec string plus the objects it needs (`head=`, `scorer=`), passed only if used."""
    name, options = parse_spec(spec)
    needs = dependencies_of(spec)
    known = options_of(name)
    unknown = [key for key in options if key not in known]
    if unknown:
        raise ValueError(f"bad options for the {name} sampler: unknown option {unknown[0]!r} "
                         f"({'its options: ' + ', '.join(known) if known else 'it takes none'})")
    for dep in needs:
        if dependencies.get(dep) is None:
            flag = {"head": "--adjust DIR", "scorer": "--scorer DIR"}[dep]
            raise ValueError(f"the {name} sampler needs {flag}")
        options[dep] = dependencies[dep]
    try:
        return SAMPLERS[name](**options)
    except TypeError as err:
        raise ValueError(f"bad options for the {name} sampler: {err}") from None


def options_of(name: str) -> list[str]:
    """The `key=value` options a sampler's spec accepts: the fields of its config dataclass."""
    hints = typing.get_type_hints(SAMPLERS[name].__init__)
    config = next((t for t in typing.get_args(hints.get("config")) if dataclasses.is_dataclass(t)), None)
    return [f.name for f in dataclasses.fields(config)] if config is not None else []
