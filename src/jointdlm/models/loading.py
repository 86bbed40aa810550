"""Open a model directory whatever family it holds."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .hf import FAMILIES, HFFamily, detect_family, load_hf_model, locate, refuse_block_diffusion, snapshot
from .mdlm import CONFIG_FILE, MODEL_TYPE, BuiltinModel, read_config
from .protocol import DiffusionLM

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               family: str | HFFamily | None = None, trust_remote_code: bool = False,
               dtype: str = "auto") -> DiffusionLM:
    """The built-in model, or a Hugging Face one (LLaDA, LLaDA-MoE, Dream, RND1) recognised by its config.json.

    A config naming one of those families is taken to the Hugging Face path only with an `auto_map`: none has a
    native transformers class, so without remote code transformers could not build it. `family` forces the
    Hugging Face path with that family's spec (it also accepts a Hub repo id in place of a directory). Remote
    code runs only with `trust_remote_code=True`. `dtype` sets a Hugging Face checkpoint's weights ("auto": as
    stored); logits reach the samplers' float32 math either way. The built-in model runs in float32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    device = resolve_device(device)
    config = Path(directory) / CONFIG_FILE
    if family is not None:
        if config.is_file() and read_config(config).get("model_type") == MODEL_TYPE:  # before transformers reads it
            raise ValueError(f"{directory} is a built-in jointdlm model; family={family!r} (--family) is for Hugging "
                             "Face checkpoints: leave it out")
        return load_hf_model(directory, family, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    directory = Path(directory)
    if not directory.is_dir():  # a Hub repo id: its snapshot (fetched, or cached), detected like a directory
        directory = Path(snapshot(locate(directory)[0]))
        config = directory / CONFIG_FILE
    if not config.exists():
        raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; is it a model directory?")
    raw = read_config(config)
    model_type = raw.get("model_type")
    if model_type == MODEL_TYPE:
        if dtype not in ("auto", "float32"):
            raise ValueError(f"the built-in model runs in float32; dtype {dtype!r} is for Hugging Face checkpoints")
        if raw.get("causal"):
            raise ValueError(f"{directory} is a causal scorer (pretrain --objective ar), not a diffusion model: its "
                             "logits predict the next token, not a masked one; give it as --scorer")
        return BuiltinModel.load(directory, device)
    refuse_block_diffusion(raw, directory)
    detected = detect_family(raw)
    if detected is not None and raw.get("auto_map"):
        return load_hf_model(directory, detected, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    why = f"; it names the {detected} family but has no auto_map (remote code)" if detected else ""
    raise ValueError(f"{directory}: model_type {model_type!r} is not supported here{why} (built-in: {MODEL_TYPE!r}; "
                     f"Hugging Face families: {', '.join(sorted(FAMILIES))}, or pass family= to force one)")


def resolve_device(device: str | torch.device) -> torch.device:
    """A device this machine has, or a ValueError that says why not (instead of a failure deep in torch)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps): {err}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU (torch "
                             f"{torch.__version__}); use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
        if resolved.index is None and "LOCAL_RANK" in os.environ:
            # A process of torchrun / accelerate launch: its own GPU, as accelerate gives it (else every process
            # would load its model onto GPU 0).
            resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported (use cpu, cuda, cuda:N or mps)")
    return resolved
