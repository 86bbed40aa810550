"""`make demo`: the whole story on the built-in default, end to end, cached stage by stage.

For each corpus: pre-train the built-in MDLM, collect its K=1 trajectories, train an ADJUST head, then
sample K=1 / naive parallel / ADJUST at K = 2, 4, 8 and print quality and speed side by side. Quality is
exact validity on the template language (whose set of valid strings is known) and the share of real words
on the English corpus. Re-running reuses every finished stage.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adjust.head import AdjustHead
from .adjust.train import AdjustTrainConfig, final_heldout, train_adjust
from .adjust.trajectories import TrajectoryConfig, collect_trajectories
from .data import get_language, read_corpus, validity_rate, write_corpus
from .eval.words import corpus_words, known_word_rate
from .models.mdlm import BuiltinModel
from .models.train import PretrainConfig, pretrain
from .sampling.base import TokenChoice
from .sampling.loop import SamplingConfig, generate
from .sampling.registry import make_sampler


@dataclass(frozen=True)
class DemoStage:
    corpus: str
    corpus_docs: int | None
    preset: str
    vocab_size: int
    pretrain_steps: int
    trajectories: int
    head_steps: int
    samples: int
    tokens_per_step: tuple[int, ...] = (2, 4, 8)


FULL = (
    DemoStage("template", 20000, "tiny", 1024, 1500, 4000, 1500, 1000),
    DemoStage("english", None, "small", 2048, 2500, 2000, 1200, 200),
)
QUICK = (
    DemoStage("template", 3000, "tiny", 1024, 150, 200, 60, 100),
    DemoStage("english", 1500, "tiny", 1024, 60, 40, 20, 8),
)


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("runs/demo")
    quick: bool = False
    seed: int = 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def prepare_stage(stage: DemoStage, root: Path, seed: int) -> tuple[BuiltinModel, AdjustHead, list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.txt"
    if not corpus.exists():
        count = write_corpus(stage.corpus, corpus, num=stage.corpus_docs, seed=seed)
        _say(f"[{stage.corpus}] wrote {count} documents to {corpus}")
    docs = read_corpus(corpus)
    model_dir = root / "model"
    done = model_dir / "training_done.json"
    if done.exists() and json.loads(done.read_text())["max_steps"] == stage.pretrain_steps:
        _say(f"[{stage.corpus}] using the cached base model in {model_dir}")
    else:
        _say(f"[{stage.corpus}] pre-training the built-in MDLM ({stage.preset}, {stage.pretrain_steps} steps)")
        pretrain(corpus, model_dir, PretrainConfig(preset=stage.preset, max_steps=stage.pretrain_steps,
                                                   vocab_size=stage.vocab_size, seed=seed, eval_every=500,
                                                   save_every=500))
    model = BuiltinModel.load(model_dir)
    length = model.max_length - 1
    _say(f"[{stage.corpus}] K=1 trajectories: {stage.trajectories} x {length} tokens")
    collect_trajectories(model, root / "trajectories",
                         TrajectoryConfig(num=stage.trajectories, length=length, seed=seed, batch_size=256,
                                          shard_size=500))
    _say(f"[{stage.corpus}] training the ADJUST head ({stage.head_steps} steps)")
    every = max(50, stage.head_steps // 3)
    head = train_adjust(model, root / "trajectories", root / "adjust",
                        AdjustTrainConfig(max_steps=stage.head_steps, seed=seed, eval_every=every, save_every=every))
    return model, head, docs


def measure(stage: DemoStage, model: BuiltinModel, head: AdjustHead, docs: list[str], seed: int) -> list[dict]:
    length = model.max_length - 1
    if stage.corpus in ("template", "agreement"):
        lang = get_language(stage.corpus)
        metric_name, metric = "validity", lambda texts: validity_rate(lang, texts)
    else:
        vocabulary = corpus_words(docs)
        metric_name, metric = "known-word rate", lambda texts: known_word_rate(texts, vocabulary)
    runs = [("sequential", 1)] + [(name, k) for k in stage.tokens_per_step for name in ("parallel", "adjust")]
    rows = []
    for name, k in runs:
        sampler = make_sampler(name, head=head) if name == "adjust" else make_sampler(name)
        config = SamplingConfig(length=length, tokens_per_step=k, choice=TokenChoice(), seed=seed, batch_size=250,
                                progress=True)
        out = generate(model, sampler, config, num=stage.samples)
        c = out.counters
        rows.append({"corpus": stage.corpus, "sampler": name, "tokens_per_step": k, "metric": metric_name,
                     "quality": metric(out.texts), "base_passes": c.base_passes, "head_passes": c.extra_passes,
                     "ms_per_sequence": 1000 * c.wall_time_s / c.samples, "example": out.texts[0]})
    reference = rows[0]["ms_per_sequence"]
    for row in rows:
        row["speedup_vs_k1"] = reference / row["ms_per_sequence"]
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| corpus | sampler | K | quality | base passes | head passes | ms/seq | speed-up vs K=1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['sampler']} | {r['tokens_per_step']} | {r['metric']} {r['quality']:.3f} "
                     f"| {r['base_passes']:.1f} | {r['head_passes']:.1f} | {r['ms_per_sequence']:.1f} "
                     f"| {r['speedup_vs_k1']:.2f}x |")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> list[dict]:
    started = time.time()
    torch.manual_seed(cfg.seed)
    stages = QUICK if cfg.quick else FULL
    all_rows: list[dict] = []
    heldout = {}
    for stage in stages:
        model, head, docs = prepare_stage(stage, cfg.workdir / stage.corpus, cfg.seed)
        heldout[stage.corpus] = final_heldout(cfg.workdir / stage.corpus / "adjust")
        rows = measure(stage, model, head, docs, cfg.seed)
        all_rows.extend(rows)
        print(f"\n## {stage.corpus}: {stage.samples} samples per row, temperature 1, confidence rule\n")
        print(format_table(rows))
        print("\nexamples:")
        for r in rows:
            print(f"  {r['sampler']:>10} K={r['tokens_per_step']}: {r['example']}")
        sys.stdout.flush()
    elapsed = time.time() - started
    command = "jointdlm demo" + (" --quick" if cfg.quick else "") + f" --workdir {cfg.workdir} --seed {cfg.seed}"
    report = {"command": command, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, python {platform.python_version()}", "elapsed_s": round(elapsed, 1),
              "rows": all_rows, "heldout_kl": heldout}
    (cfg.workdir / "results.json").write_text(json.dumps(report, indent=2))
    (cfg.workdir / "results.md").write_text(f"Command: `{command}`\n\n{format_table(all_rows)}\n")
    print(f"\ndemo finished in {elapsed / 60:.1f} min; table in {cfg.workdir / 'results.md'}")
    return all_rows
