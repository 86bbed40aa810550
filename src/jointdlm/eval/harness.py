"""jointdlm as an lm-evaluation-harness model: `jointdlm lm-eval run --model jointdlm --model_args ... --tasks ...`.

lm-eval has no plugin entry points, so `jointdlm lm-eval` registers the class below under the name `jointdlm`
and then runs lm-eval's own command line with the arguments given. Every sampler and sampling option is a model
argument, e.g. `pretrained=DIR,sampler=adjust,adjust=HEAD,tokens_per_step=4` or `sampler=punt:epsilon=0.05`.

* `generate_until` samples the continuation of each context with the chosen sampler (the canvas holds
  `max_gen_toks` masks, 256 unless the task says, as lm-eval's own models) and cuts it at the first `until` string.
  A context that fills the window keeps its last tokens (as lm-eval's Hugging Face model does) instead of
  stopping the run.
* `loglikelihood` is a Monte Carlo estimate over masks, as LLaDA evaluates: for each of `mc_samples` draws, mask
  l ~ U{1..n} of the continuation's n tokens and add (n / l) x the log-probability of the masked tokens; the mean
  is a lower bound on log p(continuation | context). The continuation's tokens are those of context + continuation
  after the context's (a context's trailing spaces move to the continuation), as lm-eval splits them. `is_greedy`
  decodes the fully masked continuation greedily one token per pass, the most confident first, as LLaDA's
  evaluation does (stopping at the first token that differs). `loglikelihood_rolling` (perplexity of whole
  documents) is not defined for this estimate and stops with a clear error.
* Every request's randomness comes from its own content and the seed (and, for repeated identical requests, which
  repeat it is), so its result does not depend on the other requests of the run or on the batch.
* After each request type, base passes, head passes and tokens/s go to stderr beside lm-eval's own table.
* `--apply_chat_template`: lm-eval asks the model to format each request's turns; the checkpoint's own chat
  template does it, and the contexts that come back are encoded with their special tokens parsed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..sampling.base import TokenChoice
from ..sampling.loop import KV_CACHES, SamplingConfig, generate


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as err:
        raise ImportError("jointdlm lm-eval needs lm-evaluation-harness: pip install 'jointdlm[lmeval]'") from err
    return LM, register_model


def _integer(name: str, value: Any, minimum: int | None = None) -> int:
    """lm-eval hands model_args over as it parsed them: numbers, booleans, None, or the text itself."""
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"model_args {name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"model_args {name} must be >= {minimum}, got {value}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"model_args {name} must be a number, got {value!r}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    """Only true/false (or 1/0): `trust_remote_code=no` must not read as yes."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValueError(f"model_args {name} must be true or false, got {value!r}")


def _model_class():
    LM, register_model = _lm_eval()

    @register_model("jointdlm")
    class JointDLMHarnessModel(LM):
        def __init__(self, pretrained: str, sampler: str = "sequential", adjust: str | None = None,
                     scorer: str | None = None, family: str | None = None, trust_remote_code: bool = False,
                     tokens_per_step: int = 1, steps: int | None = None, block_length: int | None = None,
                     rule: str = "confidence", temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     device: str = "cpu", batch_size: int | str = 16, max_gen_toks: int | None = None,
                     seed: int = 0, mc_samples: int = 32, dtype: str = "auto", kv_cache: str | None = None,
                     **unused: Any) -> None:
            super().__init__()
            from ..adjust.head import AdjustHead
            from ..models.causal import CausalScorer
            from ..models.loading import load_model
            from ..sampling.registry import dependencies_of, make_from_spec, parse_spec

            if unused:
                raise ValueError(f"unknown jointdlm model_args: {', '.join(sorted(unused))}")
            # Every number before the model loads (minutes for a 7B checkpoint), each named when it is wrong.
            trust_remote_code = _flag("trust_remote_code", trust_remote_code)
            tokens_per_step = _integer("tokens_per_step", tokens_per_step, 1)
            steps = None if steps is None else _integer("steps", steps, 1)
            block_length = None if block_length is None else _integer("block_length", block_length, 1)
            if kv_cache is not None and kv_cache not in KV_CACHES:
                raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
            if kv_cache is not None and block_length is None:
                raise ValueError("kv_cache needs semi-autoregressive blocks (block_length)")
            # lm-eval's --batch_size auto:N (re-detect N times) is auto here too: a fixed 16
            auto = isinstance(batch_size, str) and batch_size.split(":")[0] == "auto"
            batch = 16 if auto else _integer("batch_size", batch_size, 1)
            max_gen_toks = None if max_gen_toks is None else _integer("max_gen_toks", max_gen_toks, 1)
            seed, mc_samples = _integer("seed", seed), _integer("mc_samples", mc_samples, 1)
            top_k = _integer("top_k", top_k)
            self.choice = TokenChoice(rule=rule, temperature=_number("temperature", temperature), top_k=top_k,
                                      top_p=_number("top_p", top_p))
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval passes its default "cuda:0" whatever the machine; its own HF model falls back the same way.
                print("jointdlm lm-eval: no CUDA GPU here, running on the CPU", file=sys.stderr)
                device = "cpu"
            name, _ = parse_spec(str(sampler))
            needs = dependencies_of(str(sampler))
            if adjust and "head" not in needs:
                raise ValueError(f"adjust= is only used by the adjust sampler (or punt:via=adjust), not {name}")
            for dep, arg in (("head", adjust), ("scorer", scorer)):
                if dep in needs and not arg:
                    raise ValueError(f"the {name} sampler needs {'adjust' if dep == 'head' else 'scorer'}=DIR")
            self.model = load_model(pretrained, device, family=family, trust_remote_code=trust_remote_code,
                                    dtype=str(dtype))
            head = AdjustHead.from_pretrained(adjust, self.model) if adjust else None
            judge = CausalScorer.load(scorer, device) if scorer else None
            self.sampler = make_from_spec(str(sampler), head=head, scorer=judge)
            self.tokens_per_step, self.steps, self.block_length = tokens_per_step, steps, block_length
            self.kv_cache = kv_cache
            self.batch, self.max_gen_toks, self.seed, self.mc_samples = batch, max_gen_toks, seed, mc_samples
            self.spec_text = str(sampler)
            self.templated = False  # lm-eval put the contexts in the chat template (--apply_chat_template)

        # -- chat template (--apply_chat_template) -----------------------------------------------------------
        def _hf_tokenizer(self) -> Any:
            hf = getattr(self.model.tokenizer, "hf", None)
            if hf is None or not getattr(hf, "chat_template", None):
                raise ValueError("--apply_chat_template needs a checkpoint whose tokenizer has a chat template "
                                 "(an instruct checkpoint)")
            return hf

        @property
        def tokenizer_name(self) -> str:
            hf = getattr(self.model.tokenizer, "hf", None)
            return str(getattr(hf, "name_or_path", "jointdlm")).replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self._hf_tokenizer().chat_template if chat_template else ""

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            self.templated = True
            return self._hf_tokenizer().apply_chat_template(chat_history, tokenize=False,
                                                            add_generation_prompt=add_generation_prompt,
                                                            continue_final_message=not add_generation_prompt)

        def _prefixes(self, contexts: list[str]) -> list[list[int]]:
            from ..sampling.loop import encode_prompts

            return encode_prompts(self.model, contexts, templated=self.templated)

        # -- generation -----------------------------------------------------------------------------------
        def generate_until(self, requests) -> list[str]:
            outputs: list[str | None] = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            prefixes: list[list[int]] = [[] for _ in requests]
            indices = [0] * len(requests)
            repeats: dict[tuple, int] = {}
            for i, request in enumerate(requests):
                context, gen_kwargs = request.args
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                limit = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks or DEFAULT_MAX_GEN_TOKS)
                prefix, length = self._fit(self._prefixes([context])[0], limit)
                groups.setdefault((tuple(until), length), []).append(i)
                prefixes[i] = prefix
                key = (context, tuple(until), limit)
                repeats[key] = repeats.get(key, -1) + 1
                indices[i] = request_seed(self.seed, *key, repeats[key])
            started, passes, head_passes, tokens = time.perf_counter(), 0.0, 0.0, 0
            for (until, length), rows in groups.items():
                contexts = [requests[i].args[0] for i in rows]
                # A canvas no longer than a block has nothing to cache: whole-canvas passes.
                blocks = self.block_length is not None and self.block_length < length
                config = SamplingConfig(length=length, tokens_per_step=self.tokens_per_step, steps=self.steps,
                                        block_length=self.block_length, choice=self.choice, seed=self.seed,
                                        batch_size=self.batch, kv_cache=self.kv_cache if blocks else None)
                out = generate(self.model, self.sampler, config, prompts=contexts,
                               prefixes=[prefixes[i] for i in rows], sample_indices=[indices[i] for i in rows])
                for i, text in zip(rows, out.texts, strict=True):
                    cuts = [text.find(stop) for stop in until if stop and stop in text]
                    outputs[i] = text[: min(cuts)] if cuts else text
                c = out.counters
                passes += c.base_passes * c.samples
                head_passes += c.extra_passes * c.samples
                tokens += c.generated_tokens
            elapsed = time.perf_counter() - started
            n = max(1, len(requests))
            print(f"jointdlm lm-eval [{self.spec_text}, K={self.tokens_per_step}]: {len(requests)} generations, "
                  f"base passes {passes / n:.1f}/sample, head or scorer passes {head_passes / n:.1f}/sample, "
                  f"{tokens / elapsed if elapsed > 0 else 0:.1f} tokens/s", file=sys.stderr)
            return [o or "" for o in outputs]

        def _fit(self, prefix: list[int], limit: int) -> tuple[list[int], int]:
            """A context's ids and the tokens to generate after it, in the model's window: at most `limit` and what
            the window leaves after the context; a context that fills the window keeps its last tokens, leaving
            min(limit, half the window). A request's canvas depends on it alone, not on the requests beside it."""
            window = self.model.max_length
            if len(prefix) < window:
                return prefix, min(limit, window - len(prefix))
            length = min(limit, window // 2)
            return prefix[len(prefix) + length - window:], length

        # -- likelihood ------------------------------------------------------------------------------------
        @torch.no_grad()
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            from ..sampling.loop import build_canvas

            results = []
            spec = self.model.spec
            for request in requests:
                context, continuation = request.args
                prefix, target = self._split(context, continuation)
                if not target:
                    results.append((0.0, True))
                    continue
                n = len(target)
                if n >= self.model.max_length:
                    raise ValueError(f"a continuation of {n} tokens does not fit the model's window of "
                                     f"{self.model.max_length} tokens")
                prefix = prefix[max(0, len(prefix) + n - self.model.max_length):]  # the context's last tokens
                tokens, attention, start = build_canvas(self.model, [prefix], n)
                truth = torch.tensor(target, device=tokens.device)
                gen = torch.Generator().manual_seed(request_seed(self.seed, context, continuation))
                weights = torch.zeros(self.mc_samples)
                hidden = torch.zeros(self.mc_samples, n, dtype=torch.bool)
                for m in range(self.mc_samples):
                    count = int(torch.randint(1, n + 1, (1,), generator=gen))
                    masked = torch.randperm(n, generator=gen)[:count]
                    hidden[m, masked] = True
                    weights[m] = n / count
                picked = torch.zeros(self.mc_samples, n)
                for first in range(0, self.mc_samples, self.batch):  # batch_size draws a pass, not all of them
                    rows = hidden[first:first + self.batch]
                    canvases = tokens.repeat(len(rows), 1)
                    canvases[:, start:] = torch.where(rows.to(tokens.device), spec.mask_id, truth)
                    logits = self.model.forward(canvases, attention.repeat(len(rows), 1)).logits[:, start:]
                    logprobs = torch.log_softmax(logits.float(), dim=-1)
                    picked[first:first + len(rows)] = logprobs.gather(
                        -1, truth.expand(len(rows), n)[..., None])[..., 0].cpu()
                estimate = float(((picked * hidden).sum(-1) * weights).mean())
                results.append((estimate, self._greedy_matches(tokens, attention, start, truth)))
            return results

        def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """The context's ids and the continuation's, as lm-eval splits a pair: the context's trailing spaces
            move to the continuation, and the continuation's ids are those of the whole after the context's (so
            "Answer:" + " B" is scored as the one token " B" where the tokenizer has it)."""
            spaces = len(context) - len(context.rstrip(" "))
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            prefix, whole = self._prefixes([context, context + continuation])
            if whole[:len(prefix)] == prefix:
                return prefix, whole[len(prefix):]
            return prefix, list(self.model.tokenizer.encode(continuation))  # a token across the seam: apart

        def _greedy_matches(self, tokens: torch.Tensor, attention: torch.Tensor, start: int,
                            truth: torch.Tensor) -> bool:
            """Whether greedy decoding of the masked continuation, one token per pass at the most confident
            position (LLaDA's), writes `truth`; it stops at the first token that differs."""
            canvas = tokens.clone()
            canvas[:, start:] = self.model.spec.mask_id
            banned = self.model.spec.never_sampled()
            for _ in range(len(truth)):
                open_ = canvas[0, start:] == self.model.spec.mask_id
                logits = self.model.forward(canvas, attention).logits[0, start:].float()
                logits[:, banned] = -torch.inf
                best, ids = logits.log_softmax(-1).max(-1)
                at = int(best.masked_fill(~open_, -torch.inf).argmax())
                if ids[at] != truth[at]:
                    return False
                canvas[0, start + at] = ids[at]
            return True

        def loglikelihood_rolling(self, requests) -> list[float]:
            raise NotImplementedError("loglikelihood_rolling (whole-document perplexity) is not supported for "
                                      "masked diffusion models in jointdlm; use generate_until or loglikelihood "
                                      "tasks")

    return JointDLMHarnessModel


DEFAULT_MAX_GEN_TOKS = 256
"""Tokens a generation request may write when neither its task nor max_gen_toks says: lm-eval's own models' 256
(gsm8k sets none, and its chains of reasoning run past 64)."""


def request_seed(seed: int, *content: object) -> int:
    """A request's own 63-bit seed: from the run's seed and the request's content alone."""
    from ..sampling.rules import mix_seed

    digest = hashlib.sha256(json.dumps([str(c) for c in content]).encode()).digest()
    return mix_seed(seed, int.from_bytes(digest[:8], "little"))


def register() -> type:
    """Register the `jointdlm` model with lm-eval (idempotent) and return its class."""
    import lm_eval.models  # noqa: F401  (lm-eval's own models stay available beside ours)
    from lm_eval.api.registry import model_registry

    if "jointdlm" in model_registry:
        return model_registry.get("jointdlm")
    return _model_class()


TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
"""jointdlm's list and arithmetic tasks as lm-eval tasks (jointdlm_copy ... jointdlm_add, group jointdlm_tasks)."""


def run_harness(argv: list[str]) -> None:
    """lm-eval's own command line, with `jointdlm` registered as a model and jointdlm's tasks on the task path
    (beside lm-eval's own and any --include_path)."""
    _lm_eval()
    register()
    import lm_eval.tasks
    from lm_eval._cli import HarnessCLI

    original = lm_eval.tasks.TaskManager
    parser = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        args = parser.parse_args()
    finally:
        sys.argv = saved
    requested = getattr(args, "tasks", None)
    requested = [] if not requested else [t for task in ([requested] if isinstance(requested, str) else requested)
                                          for t in task.split(",") if t]

    class WithJointdlmTasks(original):
        def __init__(self, *args, include_path=None, include_defaults=True, **kwargs):
            given = [] if include_path is None else list(include_path) if isinstance(include_path, list | tuple) \
                else [include_path]
            paths = [str(TASKS_DIR), *given]
            if include_defaults and only_local_tasks(requested, paths, original):
                include_defaults = False  # indexing lm-eval's ~15k built-in tasks takes seconds and is not needed
            super().__init__(*args, include_path=paths, include_defaults=include_defaults, **kwargs)

    lm_eval.tasks.TaskManager = WithJointdlmTasks  # lm-eval has no hook for a package's tasks
    try:
        parser.execute(args)
    finally:
        lm_eval.tasks.TaskManager = original


def only_local_tasks(requested: list[str], paths: list[str], manager: type) -> bool:
    """Whether every requested task is a plain name found in jointdlm's and the user's task directories (no
    globs, files or directories, which may mean lm-eval's own tasks)."""
    if not requested or any(set(t) & set("*?[") or t.endswith(".yaml") or Path(t).is_dir() for t in requested):
        return False
    local = set(manager(include_path=paths, include_defaults=False).all_tasks)
    return all(t in local for t in requested)


def write_gsm8k_task(data_file: str | Path, out_dir: str | Path, task: str = "gsm8k_local",
                     num_fewshot: int = 0) -> Path:
    """A task YAML for GSM8K-format JSONL ({"question", "answer"} with "#### N" answers) on disk: it includes
    lm-eval's own gsm8k.yaml, so prompts, filters ("strict-match": "#### N"; "flexible-extract": the last number)
    and exact-match scoring are lm-eval's, and only the data source changes. Use with `--include_path out_dir`."""
    import lm_eval

    data_file, out_dir = Path(data_file).resolve(), Path(out_dir)
    if not data_file.is_file():
        raise FileNotFoundError(f"GSM8K data file {data_file} does not exist")
    base = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task}.yaml"
    path.write_text(
        f"include: {base}\n"
        f"task: {task}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n    train: {data_file}\n"
        f"num_fewshot: {num_fewshot}\n")
    return path
