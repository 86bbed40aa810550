"""Where a sampler's time goes: base passes, head passes (and their output layer), log-probabilities, position
scores, token draws and the rest, from one profiled generation per sampler (cProfile: on a CPU every operation
runs before the call returns, so a function's cumulative time is what it cost).

The question it answers for issue #14: what one ADJUST head pass costs against one base pass on a given base,
and which part of it grows with the vocabulary (the output layer and the scores work on candidates x vocabulary,
log-probabilities and the draw on the chosen candidate's vocabulary), measured instead of estimated from two rows'
speeds.

    python benchmarks/step_profile.py --model runs/demo/template/model --adjust runs/deep2/tpl_r11_s0 \\
        --length 23 --samplers adjust:threshold=0.9:16,threshold:tau=0.5:extra=1:2
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
from collections.abc import Callable

import torch
from sampler_time import load_runs, require_positive

from jointdlm.adjust.head import AdjustHead, StepPasses
from jointdlm.models.mdlm import BuiltinModel
from jointdlm.sampling import rules
from jointdlm.sampling.adjust import AdjustSampler
from jointdlm.sampling.base import StepContext
from jointdlm.sampling.loop import SamplingConfig, generate
from jointdlm.sampling.registry import make_from_spec


def key(function: Callable) -> tuple[str, int, str]:
    """cProfile's key of a Python function."""
    code = function.__code__
    return code.co_filename, code.co_firstlineno, code.co_name


PARTS = {"base passes": StepContext.forward, "head passes": StepPasses.logits,
         "of which the output layer": AdjustHead.logits, "log-probabilities": rules.model_logprobs,
         "token draws": rules.draw}
"""Buckets by the function whose cumulative time they are; none is called inside another's call but the output
layer, inside head passes. Position scores are counted apart ("position scores" in `profile`)."""


def cumulative(stats: pstats.Stats, function: Callable, leave_out: Callable | None = None) -> tuple[float, int]:
    """(seconds, calls) of `function`, without the calls made from `leave_out`."""
    entry = stats.stats.get(key(function))
    if entry is None:
        return 0.0, 0
    _, calls, _, seconds, callers = entry
    if leave_out is not None and key(leave_out) in callers:
        _, nested_calls, _, nested_seconds = callers[key(leave_out)]
        seconds, calls = seconds - nested_seconds, calls - nested_calls
    return seconds, calls


def builtin_from(stats: pstats.Stats, name: str, caller: Callable) -> float:
    """Seconds spent in built-in functions whose name holds `name` when called directly from `caller`."""
    return sum(callers[key(caller)][3] for (file, _, function), (*_, callers) in stats.stats.items()
               if file == "~" and name in function and key(caller) in callers)


def profile(model: BuiltinModel, spec: str, k: int, head: AdjustHead | None, length: int, num: int,
            batch_size: int) -> dict[str, float]:
    sampler = make_from_spec(spec, head=head, scorer=None)
    config = SamplingConfig(length=length, tokens_per_step=k, seed=1, batch_size=batch_size,
                            stop_at_text_end=False)  # a step's parts on whole canvases: every row, every step
    generate(model, sampler, config, num=min(num, batch_size))  # warm-up
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        result = generate(model, sampler, config, num=num)
        profiler.disable()
    stats = pstats.Stats(profiler)
    out = {"total": result.counters.wall_time_s}
    for name, function in PARTS.items():
        out[name], out[name + " calls"] = cumulative(stats, function)
    # Scores: every rule's scores from the base pass (position_scores) and from head passes (marginal_scores
    # called by the head's rounds; inside position_scores it is counted once, there).
    out["position scores"] = (cumulative(stats, rules.position_scores)[0]
                              + cumulative(stats, rules.marginal_scores, leave_out=rules.position_scores)[0])
    # The head's passes score candidates from their logits (top_probability) and take log-probabilities at the
    # chosen one only (a torch call from the sampler itself).
    out["position scores"] += cumulative(stats, rules.top_probability)[0]
    out["log-probabilities"] += builtin_from(stats, "log_softmax", AdjustSampler._head_rounds)
    counted = sum(out[name] for name in PARTS if name != "of which the output layer") + out["position scores"]
    out["the rest"] = out["total"] - counted
    out["base passes per sample"] = result.counters.base_passes
    out["head passes per sample"] = result.counters.extra_passes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adjust", help="ADJUST head directory (for adjust samplers)")
    parser.add_argument("--samplers", required=True, help="comma-separated SPEC:K (K: tokens per step)")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_positive(parser, args, ("length", "num", "batch_size", "threads"))
    torch.set_num_threads(args.threads)
    try:
        model, head, runs = load_runs(args.model, args.adjust, args.samplers)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    names = [*PARTS, "position scores", "the rest"]
    print(f"| sampler | total s | {' | '.join(names)} | base / head passes per sample "
          "| one head pass / one base pass |")
    print("|---" * (len(names) + 4) + "|")
    for item, spec, k in runs:
        p = profile(model, spec, k, head, args.length, args.num, args.batch_size)
        cells = [f"{p[name]:.3f} ({p[name] / p['total']:.0%})" for name in names]
        ratio = "–"
        if p["head passes calls"] and p["base passes calls"]:
            ratio = f"{(p['head passes'] / p['head passes calls']) / (p['base passes'] / p['base passes calls']):.3f}"
        print(f"| {item} | {p['total']:.3f} | {' | '.join(cells)} | {p['base passes per sample']:.1f} / "
              f"{p['head passes per sample']:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
