"""Open a model directory whatever family it holds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .mdlm import CONFIG_FILE, MODEL_TYPE, BuiltinModel
from .protocol import DiffusionLM


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> DiffusionLM:
    directory = Path(directory)
    config = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not config.exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a model directory?")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type == MODEL_TYPE:
        return BuiltinModel.load(directory, device)
    raise ValueError(f"{directory}: model_type {model_type!r} is not supported here "
                     f"(built-in: {MODEL_TYPE!r})")
