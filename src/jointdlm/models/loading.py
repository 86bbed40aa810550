"""Open a model directory whatever family it holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .hf import FAMILIES, HFFamily, detect_family, load_hf_model
from .mdlm import CONFIG_FILE, MODEL_TYPE, BuiltinModel
from .protocol import DiffusionLM


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               family: str | HFFamily | None = None) -> DiffusionLM:
    """The built-in model, or a Hugging Face one (LLaDA / Dream) recognised by its config.json.

    A config naming LLaDA or Dream is taken to the Hugging Face path only with an `auto_map`: neither family has
    a native transformers class, so without remote code transformers could not build it. `family` forces the
    Hugging Face path with that family's spec (it also accepts a Hub repo id in place of a directory).
    """
    if family is not None:
        return load_hf_model(directory, family, device=device)
    directory = Path(directory)
    config = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not config.exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a model directory?")
    raw = json.loads(config.read_text())
    model_type = raw.get("model_type")
    if model_type == MODEL_TYPE:
        return BuiltinModel.load(directory, device)
    detected = detect_family(raw)
    if detected is not None and raw.get("auto_map"):
        return load_hf_model(directory, detected, device=device)
    why = f"; it names the {detected} family but has no auto_map (remote code)" if detected else ""
    raise ValueError(f"{directory}: model_type {model_type!r} is not supported here{why} (built-in: {MODEL_TYPE!r}; "
                     f"Hugging Face families: {', '.join(sorted(FAMILIES))}, or pass family= to force one)")
