"""The evaluation grid: samplers x tokens per step, every quality metric beside every speed counter.

The reference is always K=1 (sequential) samples of the same base at the same temperature, generated once
per run and cached in the output directory; the K=1 row of the table is an independent K=1 draw (another
seed), so it shows the noise ceiling of each metric rather than a trivial 1.0.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.causal import CausalScorer
from ..models.protocol import DiffusionLM
from ..outputs import atomic_write_text, check_output_dir
from ..sampling.base import TokenChoice
from ..sampling.loop import Generation, SamplingConfig, build_canvas, encode_prompts, fill_length, generate
from ..sampling.registry import SAMPLERS, dependencies_of, make_from_spec, parse_spec
from . import metrics

REFERENCE_FILE = "reference.jsonl"
RESULTS_FILE = "results.json"
SAMPLES_VERSION = 2
"""Part of the cached reference's key, raised when the same seed stops giving the same samples or texts (2: draws by
inverse CDF, and text ending at a PAD, 2026-12-07), so a reference cached by older code is sampled again."""
TABLE_FILE = "results.md"


@dataclass(frozen=True)
class EvalConfig:
    samplers: tuple[str, ...] = ("parallel", "adjust")
    tokens_per_step: tuple[int, ...] = (1, 2, 3, 4, 8)
    num: int = 200
    seed: int = 0
    task: str | None = None
    language: str | None = None
    length: int | None = None
    choice: TokenChoice = field(default_factory=TokenChoice)
    batch_size: int = 250
    block_length: int | None = None
    kv_cache: str | None = None
    """Every row but the K=1 reference samples (always computed exactly, so MAUVE shows what the cache costs)."""
    mauve_seeds: tuple[int, ...] = (0, 1, 2)
    history_examples: int = 4
    timing_repeats: int = 1
    """Each row is sampled this many times (same seed, so the same samples), in rounds that run every row once, and
    its wall time is the median: rows of 0.1-0.2 s on a fast language timed 4.3x and 5.0x K=1's tokens/s for the
    same samples in one run."""

    def __post_init__(self) -> None:
        for spec in self.samplers:
            parse_spec(spec)
        if not self.tokens_per_step or min(self.tokens_per_step) < 1:
            raise ValueError(f"tokens per step must be >= 1, got {self.tokens_per_step}")
        for name, values in (("samplers", self.samplers), ("tokens_per_step", self.tokens_per_step)):
            repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if repeated is not None:
                raise ValueError(f"{name} lists {repeated} twice (each row would be sampled again); give it once")
        if self.timing_repeats < 1:
            raise ValueError(f"timing_repeats must be >= 1, got {self.timing_repeats}")
        if self.num < 2:
            raise ValueError(f"num must be >= 2 for a spread, got {self.num}")
        if self.language is not None:
            from ..data import get_language

            get_language(self.language)
        if self.task is not None:
            from ..data.tasks import make_examples

            make_examples(self.task, 1, seed=0, split="heldout")


def _prompts(cfg: EvalConfig):
    if cfg.task is None:
        return None, None
    from ..data.tasks import make_examples

    examples = make_examples(cfg.task, cfg.num, seed=10_000 + cfg.seed, split="heldout")
    return examples, [e.prompt for e in examples]


def _quality(cfg: EvalConfig, texts: list[str], reference: list[str], scorer: CausalScorer | None,
             examples, model: DiffusionLM) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if cfg.language:
        from ..data import get_language

        lang = get_language(cfg.language)
        out["validity"] = asdict(metrics.validity(lang, texts))
        out["tv_distance"] = asdict(metrics.total_variation(lang, texts))
    if examples is not None:
        out["accuracy"] = asdict(metrics.task_accuracy(examples, texts))
        tasks = list(dict.fromkeys(e.task for e in examples))
        if len(tasks) > 1:
            by_task = {}
            for task in tasks:
                pairs = [(e, t) for e, t in zip(examples, texts, strict=True) if e.task == task]
                by_task[task] = asdict(metrics.task_accuracy([e for e, _ in pairs], [t for _, t in pairs]))
            out["accuracy_by_task"] = by_task
    if scorer is not None:
        out["nll"] = asdict(metrics.nll(scorer, texts))
        out["entropy"] = asdict(metrics.entropy(scorer, texts))
        out["length"] = asdict(metrics.sample_length(scorer, texts))
        out["mauve"] = asdict(metrics.mauve_texts(scorer, reference, texts, seeds=cfg.mauve_seeds))
    if not out:
        # No language, task or scorer: still compare with the K=1 reference, on the base's own features.
        out["mauve_base"] = asdict(metrics.mauve_base(model, reference, texts, seeds=cfg.mauve_seeds))
    return out


def primary_metric(row: dict) -> str | None:
    for name in ("validity", "accuracy", "mauve", "nll", "mauve_base"):
        if name in row["quality"]:
            return name
    return None


def _run(model: DiffusionLM, spec: str, k: int, cfg: EvalConfig, length: int, prompts, seed: int, head,
         scorer: CausalScorer | None, kv_cache: str | None = None) -> Generation:
    sampler = make_from_spec(spec, head=head, scorer=scorer)
    config = SamplingConfig(length=length, tokens_per_step=k, choice=cfg.choice, seed=seed,
                            batch_size=cfg.batch_size, record_history=True, progress=True,
                            block_length=cfg.block_length, kv_cache=kv_cache)
    return generate(model, sampler, config, prompts=prompts, num=None if prompts else cfg.num)


def follows_budget(spec: str) -> bool:
    """Whether a sampler's rows differ by K: samplers that fill K per step, and adaptive ADJUST, for which K
    is the most a step may fill."""
    name = parse_spec(spec)[0]
    return name == "adjust" or getattr(SAMPLERS[name], "follows_budget", True)


def run_eval(model: DiffusionLM, cfg: EvalConfig, out: str | Path, adjust_head=None,
             scorer: CausalScorer | None = None, command: str | None = None,
             sampler_scorer: CausalScorer | None = None) -> dict:
    """Run the grid, write results.json and results.md (and plots) into `out`, return the results. `command`, the
    command line that ran it, heads results.md and is kept in results.json, so the numbers carry their source."""
    # The samplers that need an autoregressive model (EDLM, APD) use `sampler_scorer`, else the metric's `scorer`:
    # then the NLL and MAUVE of their rows are measured by the model that chose or shaped their tokens.
    drafter = sampler_scorer if sampler_scorer is not None else scorer
    for spec in cfg.samplers:
        make_from_spec(spec, head=adjust_head, scorer=drafter)
        if sampler_scorer is None and scorer is not None and "scorer" in dependencies_of(spec):
            print(f"warning: {spec} samples with the scorer that measures its NLL and MAUVE (biased in its favour); "
                  "give it another causal LM with --sampler-scorer", file=sys.stderr)
    examples, prompts = _prompts(cfg)
    length = cfg.length or fill_length(model, prompts)
    SamplingConfig(length=length, block_length=cfg.block_length, kv_cache=cfg.kv_cache)  # a bad pair fails here
    build_canvas(model, [max(encode_prompts(model, prompts or [""]), key=len)], length)  # so does a long length
    out = check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)

    reference_path = out / REFERENCE_FILE
    reference_key = {"version": SAMPLES_VERSION, "seed": cfg.seed + 1000, "num": cfg.num, "length": length,
                     "task": cfg.task,
                     "choice": asdict(cfg.choice), "model": model.fingerprint(), "block_length": cfg.block_length}
    reference = None
    if reference_path.exists():
        rows_read = [json.loads(line) for line in reference_path.read_text().splitlines()]
        if rows_read and rows_read[0].get("key") == reference_key:
            reference = [row["text"] for row in rows_read[1:]]
    cached = reference is not None
    if reference is None:
        print("generating the K=1 reference samples", file=sys.stderr)
        ref = _run(model, "sequential", 1, cfg, length, prompts, cfg.seed + 1000, adjust_head, drafter)
        reference = ref.texts
        atomic_write_text(reference_path,
                          "\n".join(json.dumps(r) for r in [{"key": reference_key}] + [{"text": t} for t in reference]))

    grid = [("sequential", 1)] if 1 in cfg.tokens_per_step else []
    for spec in cfg.samplers:
        if parse_spec(spec)[0] == "sequential":
            grid = grid if ("sequential", 1) in grid else [("sequential", 1), *grid]  # K=1 is its only row
        elif follows_budget(spec):
            grid += [(spec, k) for k in cfg.tokens_per_step if k > 1]
        else:
            grid.append((spec, 1))
    def run(name: str, k: int) -> Generation:
        return _run(model, name, k, cfg, length, prompts, cfg.seed, adjust_head, drafter, cfg.kv_cache)

    if cached:
        # Nothing has run in this process yet: one untimed base pass over a batch, so the first timed row (K=1,
        # every ratio's denominator) does not pay the thread pool's and the allocator's first use.
        tokens, attention, _ = build_canvas(model, encode_prompts(model, (prompts or [""])[:1]) * min(
            cfg.batch_size, cfg.num), length)
        with torch.no_grad():
            model.forward(tokens, attention)
    rows, histories, texts = [], {}, []
    for name, k in grid:
        print(f"eval: {name} K={k}", file=sys.stderr)
        gen = run(name, k)
        rows.append({"sampler": name, "tokens_per_step": k if follows_budget(name) else None,
                     "quality": _quality(cfg, gen.texts, reference, scorer, examples, model),
                     "speed": gen.counters.as_dict(), "examples": gen.texts[:3]})
        histories[f"{name} K={k}"] = gen.history[: cfg.history_examples]
        texts.append(gen.texts if cfg.timing_repeats > 1 else None)
    _time_in_rounds(rows, texts, cfg.timing_repeats, run, grid)
    base_time = next((r["speed"]["wall_time_s"] for r in rows if r["sampler"] == "sequential"), None)
    for row in rows:
        wall = row["speed"]["wall_time_s"]
        row["speed"]["speedup_vs_k1"] = base_time / wall if base_time and wall else None
        naive = next((r for r in rows if r["sampler"] == "parallel" and r["tokens_per_step"] == row["tokens_per_step"]),
                     None)
        row["speed"]["time_vs_naive"] = wall / naive["speed"]["wall_time_s"] if naive else None

    results = {"command": command, "config": {**asdict(cfg), "length": length}, "rows": rows,
               "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                          f"python {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d"), "histories": histories}
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2))
    atomic_write_text(out / TABLE_FILE, (f"Command: `{command}`\n\n" if command else "") + format_table(results) + "\n")
    from .plots import plot_all

    plot_all(results, out)
    return results


def _time_in_rounds(rows: list[dict], texts: list[list[str] | None], repeats: int,
                    run: Callable[[str, int], Generation], grid: list[tuple[str, int]]) -> None:
    """Each row's wall time becomes the median of `repeats` timings, taken in rounds that run every row once (the
    grid's first run is round 1): a slow spell of the machine then falls on every row alike, not on the few rows
    timed during it (timed row after row, one row read 4% faster than another that was 5% slower side by side:
    docs/results.md §5). Every rerun must give the row's samples again."""
    if repeats < 2:
        return
    times = [[row["speed"]["wall_time_s"]] for row in rows]
    for round_ in range(2, repeats + 1):
        print(f"eval: timing round {round_} of {repeats}", file=sys.stderr)
        for (name, k), row_times, row_texts in zip(grid, times, texts, strict=True):
            again = run(name, k)
            if again.texts != row_texts:
                raise AssertionError(f"{name} K={k} gave other samples for the same seed")
            row_times.append(again.counters.wall_time_s)
    for row, row_times in zip(rows, times, strict=True):
        speed = row["speed"]
        speed["wall_time_s"] = round(statistics.median(row_times), 4)  # an even count: the middle two's mean
        speed["tokens_per_second"] = round(speed["generated_tokens"] / speed["wall_time_s"], 2) \
            if speed["wall_time_s"] > 0 else 0.0


def _fmt(estimate: dict | None) -> str:
    if estimate is None:
        return "–"
    return f"{estimate['value']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}]"


def _repetitive(row: dict, k1: dict | None) -> bool:
    """Whether the row's token entropy lies wholly below K=1's interval while its samples are not shorter than
    K=1's (their length interval reaches K=1's): repetition, not length (entropy grows with a sample's length)."""
    if k1 is None or row is k1:
        return False
    mine, ref = row["quality"].get("entropy"), k1["quality"].get("entropy")
    length, ref_length = row["quality"].get("length"), k1["quality"].get("length")
    shorter = bool(length and ref_length and length["high"] < ref_length["low"])
    return bool(mine and ref and mine["high"] < ref["low"] and not shorter)


def format_table(results: dict) -> str:
    rows = results["rows"]
    names = [m for m in ("validity", "tv_distance", "accuracy", "mauve", "nll", "entropy", "length", "mauve_base")
             if any(m in r["quality"] for r in rows)]
    header = ["sampler", "K", *names, "base passes", "extra passes", "tokens/pass", "tokens/s", "speed-up vs K=1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    k1 = next((r for r in rows if r["sampler"] == "sequential"), None)
    repetitive = False
    for r in rows:
        s = r["speed"]
        k = r["tokens_per_step"] if r["tokens_per_step"] is not None else "adaptive"
        speedup = f"{s['speedup_vs_k1']:.2f}x" if s.get("speedup_vs_k1") else "–"
        cells = [r["sampler"], str(k), *[_fmt(r["quality"].get(m)) + (" †" if m == "nll" and _repetitive(r, k1)
                                                                       else "") for m in names],
                 f"{s['base_passes_per_sample']:.1f}", f"{s['extra_passes_per_sample']:.1f}",
                 f"{s['tokens_per_base_pass']:.2f}", f"{s['tokens_per_second']:.0f}", speedup]
        lines.append("| " + " | ".join(cells) + " |")
        repetitive = repetitive or _repetitive(r, k1)
    if repetitive:
        lines += ["", "† entropy below K=1's whole interval at a sample length not below K=1's: more repetitive "
                      "samples than K=1's, so part of a lower NLL here is repetition, not quality."]
    by_task = [r["quality"].get("accuracy_by_task") for r in rows]
    if any(by_task):
        tasks = list(next(t for t in by_task if t))
        lines += ["", "| sampler | K | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 2)]
        for r, accuracies in zip(rows, by_task, strict=True):
            k = r["tokens_per_step"] if r["tokens_per_step"] is not None else "adaptive"
            cells = [f"{accuracies[t]['value']:.2f}" if accuracies else "–" for t in tasks]
            lines.append(f"| {r['sampler']} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
