"""Shared fixtures: one tiny MDLM trained once per session on the template toy corpus."""

from pathlib import Path

import pytest
import torch

from jointdlm.data import write_corpus
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.models.train import PretrainConfig, pretrain


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny built-in MDLM (2 layers, d=64) trained for 150 steps; a few seconds on one CPU core."""
    root = tmp_path_factory.mktemp("tiny_model")
    corpus = root / "corpus.txt"
    write_corpus("template", corpus, num=3000, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(corpus, root / "model", PretrainConfig(preset="tiny", max_steps=150, vocab_size=1024,
                                                        progress=False, eval_every=150, save_every=150))
    finally:
        torch.set_num_threads(before)
    return root / "model"


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> BuiltinModel:
    return BuiltinModel.load(tiny_model_dir)
