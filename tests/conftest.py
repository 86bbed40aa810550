"""Shared fixtures: a tiny MDLM trained briefly (fast tests) and one trained to know the choice language
(statistical tests, the ADJUST pipeline, lm-eval), each built once per session. JOINTDLM_FIXTURE_CACHE=DIR keeps
the trained one between runs while iterating."""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from jointdlm.data import write_corpus
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.models.train import PretrainConfig, pretrain


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """Two intra-op threads: head training on the tiny bases ran 1.6x faster with two than with one (the CI
    machine has two cores); more only spin when the machine is busy."""
    with threads(min(2, os.cpu_count() or 1)):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny built-in MDLM (2 layers, d=64) trained for 150 steps; a few seconds on one CPU core."""
    root = tmp_path_factory.mktemp("tiny_model")
    corpus = root / "corpus.txt"
    write_corpus("template", corpus, num=3000, seed=0)
    with threads(1):
        pretrain(corpus, root / "model", PretrainConfig(preset="tiny", max_steps=150, vocab_size=1024,
                                                        progress=False, eval_every=150, save_every=150))
    return root / "model"


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> BuiltinModel:
    return BuiltinModel.load(tiny_model_dir)


def language_model(workdir: Path, language: str) -> BuiltinModel:
    """The `tiny` preset trained 1500 steps on 20,000 sentences of a toy language (~1.5 min on 2 cores): it has
    learned the language (K=1 validity ~0.97), which the statistical tests need."""
    if not (workdir / "model" / "training_done.json").exists():
        write_corpus(language, workdir / "corpus.txt", num=20000, seed=0)
        with threads(os.cpu_count() or 1):
            pretrain(workdir / "corpus.txt", workdir / "model",
                     PretrainConfig(preset="tiny", max_steps=1500, vocab_size=1024, batch_size=128, progress=False,
                                    eval_every=500, save_every=1500))
    return BuiltinModel.load(workdir / "model")


@pytest.fixture(scope="session")
def choice_workdir(tmp_path_factory) -> Path:
    cache = os.environ.get("JOINTDLM_FIXTURE_CACHE")
    return Path(cache) / "choice" if cache else tmp_path_factory.mktemp("choice")


@pytest.fixture(scope="session")
def choice_model(choice_workdir: Path) -> BuiltinModel:
    return language_model(choice_workdir, "choice")
