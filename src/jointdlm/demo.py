"""`make demo`: the whole story on the built-in default, end to end, cached stage by stage.

For each stage: pre-train the built-in MDLM (and, for real text, the causal scorer that shares its
tokenizer), collect K=1 trajectories, train an ADJUST head, then run the evaluation grid
(K=1 / naive parallel / ADJUST at K = 1, 2, 3, 4, 8) and print the table; plots land next to it.
Quality is exact validity on the template language (its valid strings are known) and MAUVE / NLL on the
English corpus. Re-running reuses every finished stage.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .adjust.head import AdjustHead
from .adjust.train import (
    AdjustTrainConfig,
    MismatchedRunError,
    final_heldout,
    format_verdict,
    read_verdict,
    train_adjust,
)
from .adjust.trajectories import TrajectoryConfig, collect_trajectories
from .data import write_corpus
from .eval.runner import EvalConfig, format_table, run_eval
from .models.causal import CausalScorer
from .models.mdlm import BuiltinModel, read_config
from .models.train import PretrainConfig, pretrain
from .outputs import atomic_write_text, check_output_dir
from .sampling.loop import fill_length


@dataclass(frozen=True)
class DemoStage:
    corpus: str
    corpus_docs: int | None
    preset: str
    vocab_size: int
    pretrain_steps: int
    scorer_steps: int
    trajectories: int
    head_steps: int
    """Upper bound on the head's training steps (the recipe stops earlier when held-out KL settles)."""
    samples: int
    language: str | None = None
    task: str | None = None
    tokens_per_step: tuple[int, ...] = (1, 2, 3, 4, 8)
    batch_size: int = 64
    seq_len: int = 0
    lr: float = 3e-3
    prompt_separator: str | None = None
    heldout_examples: int = AdjustTrainConfig.heldout_examples


FULL = (
    DemoStage("template", 20000, "deep", 1024, 1500, 0, 4000, 3000, 500, language="template", batch_size=128),
    DemoStage("english", None, "tiny", 2048, 1000, 500, 1000, 1600, 500, seq_len=48, tokens_per_step=(1, 2, 4, 8)),
)
# Prompt-conditioned training on a random canvas at lr 1e-3: with the whole document as target, or at lr 3e-3,
# or on a fixed canvas, the small base scored 0-66% at K=1 (docs/results.md §4, benchmarks/task_training.py).
EXTRA = (
    DemoStage("tasks", 30000, "small", 1024, 8000, 0, 3000, 4000, 500, task="all", seq_len=24, lr=1e-3,
              prompt_separator="="),
)
QUICK = (
    DemoStage("template", 3000, "tiny", 1024, 150, 0, 200, 60, 100, language="template", tokens_per_step=(1, 2, 4),
              heldout_examples=32),
    DemoStage("english", 1500, "tiny", 1024, 60, 40, 40, 20, 24, tokens_per_step=(1, 4), seq_len=32,
              heldout_examples=32),
)


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("runs/demo")
    quick: bool = False
    full: bool = False
    seed: int = 0
    stages: tuple[str, ...] | None = None
    """Run only the stages with these names (their corpus names); None runs every stage of the mode."""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _trained(model_dir: Path, steps: int) -> bool:
    """Whether `model_dir` holds this stage's finished model (one trained for fewer steps is resumed). One trained
    for more is an error that names the work directory: pre-training refuses to shorten a run, in words about its
    own --out."""
    done = model_dir / "training_done.json"
    if not done.exists():
        return False
    trained = read_config(done).get("max_steps")
    if isinstance(trained, int) and trained > steps:
        raise ValueError(f"{model_dir} holds a model trained for {trained} steps, and this demo trains {steps} "
                         "(a --quick run where a full one ran?): give another --workdir, or delete it")
    return trained == steps


def prepare_stage(stage: DemoStage, root: Path, seed: int) -> tuple[BuiltinModel, AdjustHead, CausalScorer | None]:
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    if not corpus.exists():
        count = write_corpus(stage.corpus, corpus, num=stage.corpus_docs, seed=seed)
        _say(f"[{stage.corpus}] wrote {count} documents to {corpus}")
    model_dir = root / "model"
    if _trained(model_dir, stage.pretrain_steps):
        _say(f"[{stage.corpus}] using the cached base model in {model_dir}")
    else:
        _say(f"[{stage.corpus}] pre-training the built-in MDLM ({stage.preset}, {stage.pretrain_steps} steps)")
        pretrain(corpus, model_dir, PretrainConfig(preset=stage.preset, max_steps=stage.pretrain_steps,
                                                   vocab_size=stage.vocab_size, batch_size=stage.batch_size,
                                                   seq_len=stage.seq_len, lr=stage.lr, seed=seed,
                                                   prompt_separator=stage.prompt_separator,
                                                   random_canvas=stage.prompt_separator is not None,
                                                   eval_every=500, save_every=500))
    scorer = None
    if stage.scorer_steps:
        scorer_dir = root / "scorer"
        if not _trained(scorer_dir, stage.scorer_steps):
            _say(f"[{stage.corpus}] pre-training the causal scorer ({stage.preset}, {stage.scorer_steps} steps)")
            pretrain(corpus, scorer_dir, PretrainConfig(preset=stage.preset, objective="ar",
                                                        max_steps=stage.scorer_steps, seed=seed + 1,
                                                        tokenizer_from=str(model_dir), eval_every=500, save_every=500))
        scorer = CausalScorer.load(scorer_dir)
    model = BuiltinModel.load(model_dir)
    prompts = None
    if stage.task:
        from .data.tasks import make_examples

        prompts = [e.prompt for e in make_examples(stage.task, stage.trajectories, seed=seed, split="train")]
    length = fill_length(model, prompts)
    _say(f"[{stage.corpus}] K=1 trajectories: {stage.trajectories} x {length} tokens")
    collect_trajectories(model, root / "trajectories",
                         TrajectoryConfig(num=stage.trajectories, length=length, seed=seed,
                                          batch_size=256, shard_size=500), prompts=prompts)
    _say(f"[{stage.corpus}] training the ADJUST head (at most {stage.head_steps} steps)")
    every = min(250, max(20, stage.head_steps // 4))
    head_cfg = AdjustTrainConfig(max_steps=stage.head_steps, seed=seed, eval_every=every, save_every=every,
                                 heldout_examples=stage.heldout_examples)
    try:
        head = train_adjust(model, root / "trajectories", root / "adjust", head_cfg)
    except MismatchedRunError as err:
        # A head cached by an older recipe: keep it beside, train today's.
        kept = next(root / f"adjust.previous-{n}" for n in range(1, 10_000)
                    if not (root / f"adjust.previous-{n}").exists())
        (root / "adjust").rename(kept)
        _say(f"[{stage.corpus}] the cached head was trained with other settings ({'; '.join(err.problems)}); "
             f"moved to {kept}, training a new one")
        head = train_adjust(model, root / "trajectories", root / "adjust", head_cfg)
    verdict = read_verdict(root / "adjust")
    if verdict is not None:
        _say(f"[{stage.corpus}] " + format_verdict(verdict))
    return model, head, scorer


def run_demo(cfg: DemoConfig) -> dict[str, dict]:
    started = time.time()
    check_output_dir(cfg.workdir)
    stages = QUICK if cfg.quick else FULL + (EXTRA if cfg.full else ())
    if cfg.stages is not None:  # a stage named runs whether or not the mode runs it by default (tasks)
        named = QUICK if cfg.quick else FULL + EXTRA
        unknown = set(cfg.stages) - {s.corpus for s in named}
        if unknown:
            raise ValueError(f"no stage named {', '.join(sorted(unknown))} in this mode; stages: "
                             f"{', '.join(s.corpus for s in named)}")
        stages = tuple(s for s in named if s.corpus in cfg.stages)
    flags = " --quick" if cfg.quick else (" --full" if cfg.full else "")
    flags += f" --stages {','.join(cfg.stages)}" if cfg.stages is not None else ""
    command = f"jointdlm demo{flags} --workdir {cfg.workdir} --seed {cfg.seed}"
    summary = {}
    for stage in stages:
        stage_started = time.time()
        root = cfg.workdir / stage.corpus
        model, head, scorer = prepare_stage(stage, root, cfg.seed)
        evaluation = EvalConfig(samplers=("parallel", "adjust"), tokens_per_step=stage.tokens_per_step,
                                num=stage.samples, seed=cfg.seed, task=stage.task, language=stage.language)
        results = run_eval(model, evaluation, root / "eval", adjust_head=head, scorer=scorer, command=command)
        summary[stage.corpus] = {"heldout_kl": final_heldout(root / "adjust"), "table": format_table(results)}
        print(f"\n## {stage.corpus}: {stage.samples} samples per row (95% intervals), temperature 1, "
              f"confidence rule\n")
        print(format_table(results))
        print("\nexamples:")
        for row in results["rows"]:
            print(f"  {row['sampler']:>10} K={row['tokens_per_step']}: {row['examples'][0]}")
        print(f"\nplots: {root / 'eval' / 'quality.png'}, {root / 'eval' / 'unmasking_order.png'}")
        print(f"stage {stage.corpus}: {(time.time() - stage_started) / 60:.1f} min")
        sys.stdout.flush()
    elapsed = time.time() - started
    atomic_write_text(cfg.workdir / "summary.json", json.dumps({"command": command, "elapsed_s": round(elapsed, 1),
                                                               "stages": summary}, indent=2))
    print(f"\ndemo finished in {elapsed / 60:.1f} min ({command})")
    return summary
