"""The one denoising loop shared by every sampler.

text -> tokens -> canvas (BOS + prompt + `length` masks, left-padded across the batch) -> repeated
(sampler step) -> tokens -> text, with counters. Masks are filled block by block (semi-autoregressive when
`block_length` is set); each sample draws from its own generator seeded from (seed, sample index).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..models.protocol import DiffusionLM
from .base import Sampler, StepContext, TokenChoice, check_step

KV_CACHES = ("prefix", "dual")


@dataclass(frozen=True)
class SamplingConfig:
    length: int = 32
    tokens_per_step: int = 1
    steps: int | None = None
    block_length: int | None = None
    kv_cache: str | None = None
    """With blocks: "prefix" computes each pass from the current block to the end, "dual" the current block only,
    reusing keys and values recorded at the block's first step elsewhere (approximate; built-in models)."""
    choice: TokenChoice = field(default_factory=TokenChoice)
    seed: int = 0
    batch_size: int = 64
    record_history: bool = False
    validate: bool = True
    progress: bool = False
    chat: bool = False
    """Each prompt is one user turn in the model's chat template (instruct checkpoints; see `encode_prompts`)."""
    stop_at_text_end: bool = True
    """A sample stops once its text is decided: a stop token (`stop_ids`) written with every position before it
    filled. Later passes could only fill positions after the text's end, which decoding drops, so the texts are
    those of a whole-canvas run and only the passes are fewer; the unsampled positions come back as PAD (EOS where
    the model has none), history -1. Off: every position is sampled (ADJUST's trajectories train on whole canvases)."""

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")
        if self.kv_cache is not None:
            if self.kv_cache not in KV_CACHES:
                raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
            if self.block_length is None or self.block_length >= self.length:
                raise ValueError("kv_cache needs semi-autoregressive blocks shorter than the length (block_length)")
        if self.steps is not None:
            if self.steps < 1:
                raise ValueError(f"steps must be >= 1, got {self.steps}")
            if self.steps % self.num_blocks:
                raise ValueError(f"steps={self.steps} must be a multiple of the number of blocks ({self.num_blocks})")
            if self.steps // self.num_blocks > min(self.block_sizes()):
                raise ValueError(f"steps={self.steps} gives {self.steps // self.num_blocks} steps per block, more than "
                                 f"the smallest block has tokens ({min(self.block_sizes())})")

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.length / (self.block_length or self.length))

    def block_sizes(self) -> list[int]:
        size = self.block_length or self.length
        return [min(size, self.length - start) for start in range(0, self.length, size)]

    def schedule(self, block_size: int) -> list[int]:
        """Tokens to unmask at each step of one block."""
        if self.steps is None:
            k = self.tokens_per_step
            return [k] * (block_size // k) + ([block_size % k] if block_size % k else [])
        n = self.steps // self.num_blocks
        base, extra = divmod(block_size, n)
        return [base + (1 if i < extra else 0) for i in range(n) if base + (1 if i < extra else 0) > 0]


@dataclass
class Counters:
    """Per-sample averages except wall time and totals."""

    samples: int = 0
    generated_tokens: int = 0
    base_passes: float = 0.0
    extra_passes: float = 0.0
    steps: float = 0.0
    wall_time_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def tokens_per_base_pass(self) -> float:
        return self.generated_tokens / (self.base_passes * self.samples) if self.base_passes else 0.0

    def add(self, other: Counters) -> None:
        """Fold in the counters of another part of the same run (per-sample averages weighted by samples)."""
        total = self.samples + other.samples
        for name in ("base_passes", "extra_passes", "steps"):
            mean = (getattr(self, name) * self.samples + getattr(other, name) * other.samples) / max(1, total)
            setattr(self, name, mean)
        self.samples = total
        self.generated_tokens += other.generated_tokens
        self.wall_time_s += other.wall_time_s

    def as_dict(self) -> dict[str, float]:
        return {"samples": self.samples, "generated_tokens": self.generated_tokens,
                "base_passes_per_sample": self.base_passes, "extra_passes_per_sample": self.extra_passes,
                "steps_per_sample": self.steps, "wall_time_s": round(self.wall_time_s, 4),
                "tokens_per_second": round(self.tokens_per_second, 2),
                "tokens_per_base_pass": round(self.tokens_per_base_pass, 4)}


@dataclass
class Generation:
    prompts: list[str]
    texts: list[str]
    tokens: list[list[int]]
    history: list[list[int]] | None
    counters: Counters
    batched_by_length: bool = False  # padding would change rows (ignored, or rounded in bf16 on a CPU)


def sample_seed(seed: int, index: int) -> int:
    """A distinct, stable seed per (run seed, sample index)."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def encode_prompts(model: DiffusionLM, prompts: Sequence[str], chat: bool = False,
                   templated: bool = False) -> list[list[int]]:
    """Each prompt's prefix ids: BOS (if the model has one) and the prompt's tokens, special-token text kept as
    text. `chat`: the prompt as one user turn in the model's chat template, whose ids are used as they are (the
    template says whether BOS comes first, as the checkpoints' own samplers do); `templated`: the prompt is already
    in that template (lm-eval's --apply_chat_template). Either way a prompt must not bring in the mask id."""
    if not (chat or templated):
        bos = [] if model.spec.bos_id is None else [model.spec.bos_id]
        return [bos + model.tokenizer.encode(p) for p in prompts]
    encode = getattr(model.tokenizer, "encode_chat" if chat else "encode_templated", None)
    if encode is None:
        raise ValueError("chat prompts need a Hugging Face checkpoint's tokenizer with a chat template; this "
                         "model's tokenizer has none: leave out --chat")
    rows = [encode(p) for p in prompts]
    for p, row in zip(prompts, rows, strict=True):
        if model.spec.mask_id in row or not row:
            raise ValueError(f"the chat prompt {p[:40]!r} {'is empty' if not row else 'contains the mask token'} "
                             "once in the template; remove it")
    return rows


MAX_FILL = 256
"""The most tokens a default length generates: a built-in model's canvas is what it was trained on (tens to
hundreds of tokens), but a released checkpoint's window runs to 4,096 (LLaDA) or 131,072 (Dream) positions, and
filling it would make every pass of every sample that long. Pass a length for more."""


def fill_length(model: DiffusionLM, prompts: Sequence[str] | None, chat: bool = False) -> int:
    """How many tokens fill the model's canvas after the longest prompt (with BOS), at most MAX_FILL; None =
    unconditional."""
    longest = max(len(p) for p in encode_prompts(model, prompts or [""], chat))
    if longest >= model.max_length:
        raise ValueError(f"prompts of up to {longest} tokens leave no room to generate in the model's canvas of "
                         f"{model.max_length} tokens")
    return min(model.max_length - longest, MAX_FILL)


def build_canvas(model: DiffusionLM, prefixes: Sequence[Sequence[int]],
                 length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded canvas (B, P + length), its attention mask, and P (where generation starts)."""
    spec = model.spec
    longest = max(len(p) for p in prefixes)
    if longest + length > model.max_length:
        raise ValueError(f"prompt of {longest} tokens + {length} to generate exceeds the model's "
                         f"maximum of {model.max_length} tokens")
    tokens = torch.full((len(prefixes), longest + length), spec.mask_id, dtype=torch.long)
    attention = torch.ones_like(tokens)
    for row, prefix in enumerate(prefixes):
        pad = longest - len(prefix)
        tokens[row, :pad] = spec.pad_id
        attention[row, :pad] = 0
        tokens[row, pad:longest] = torch.tensor(list(prefix), dtype=torch.long)
    return tokens.to(model.device), attention.to(model.device), longest


def cut_at_stop(ids: Sequence[int], stops: Collection[int]) -> list[int]:
    """`ids` up to the first stop id (EOS, and the chat template's end-of-turn token where there is one)."""
    ids = list(ids)
    return ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]


def stop_ids(model: DiffusionLM) -> set[int]:
    """Where a sample's text ends: EOS, padding (a base learns it only after a document's end: a PAD written before
    the EOS ends the text there, where decoding would drop it and glue the tokens after it on; naive parallel
    writes one in most English samples at K=48), the ids a checkpoint's generation_config.json ends generation at,
    and the token its chat template closes an assistant's turn with (an instruct model writes it after its answer;
    decoding drops it, so what follows would be glued on)."""
    end_of_turn = getattr(model.tokenizer, "end_of_turn_ids", None)
    pad = () if model.spec.pad_id is None else (model.spec.pad_id,)
    return {model.spec.eos_id, *pad, *getattr(model, "generation_stops", ()),
            *(end_of_turn() if callable(end_of_turn) else [])}


def generate(model: DiffusionLM, sampler: Sampler, config: SamplingConfig,
             prompts: Sequence[str] | None = None, num: int | None = None,
             index_offset: int = 0, init: torch.Tensor | None = None,
             sample_indices: Sequence[int] | None = None, progress_bar: tqdm | None = None,
             prefixes: Sequence[Sequence[int]] | None = None) -> Generation:
    """Generate `num` unconditional samples, or one sample per prompt.

    Sample i draws from a generator seeded by (config.seed, index_offset + i), so any slice of a run can be
    regenerated on its own (resuming, sharding across processes) and gives the same samples.
    `progress_bar`, an open bar, is advanced instead of opening one (callers that generate in parts show one bar).
    `init` (one row of `config.length` ids per sample) pre-fills the generated region: only its mask ids are
    generated (infilling, or continuing a partly sampled canvas); the history of pre-filled positions is -1.
    `prefixes`: the prompts' ids, already encoded (`encode_prompts`), one per prompt.
    """
    if prompts is None:
        if num is None or num < 1:
            raise ValueError("give prompts or a positive number of samples")
        if config.chat:
            raise ValueError("chat=True (--chat) templates prompts; give prompts")
        prompts = [""] * num
    prompts = list(prompts)
    indices = list(sample_indices) if sample_indices is not None else \
        [index_offset + i for i in range(len(prompts))]
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} sample indices for {len(prompts)} samples")
    if init is not None and tuple(init.shape) != (len(prompts), config.length):
        raise ValueError(f"init must have shape ({len(prompts)}, {config.length}), got {tuple(init.shape)}")
    if prefixes is None:
        prefixes = encode_prompts(model, prompts, config.chat)
    elif len(prefixes) != len(prompts):
        raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
    prefixes = [list(p) for p in prefixes]
    counters = Counters(samples=len(prompts))
    all_tokens: list[list[int]] = [[] for _ in prompts]
    history: list[list[int]] = [[] for _ in prompts]
    by_length = not getattr(model, "pads_exactly", True) and len({len(p) for p in prefixes}) > 1
    _check_run(model, sampler, config, prefixes)  # fail before the progress bar starts
    own_bar = progress_bar is None
    bar = tqdm(total=len(prompts), disable=not config.progress, desc=f"sample {sampler.name}", dynamic_ncols=True) \
        if own_bar else progress_bar
    start = time.perf_counter()
    # closed (its line ended) even when a step fails, so an error message starts on its own line
    with bar if own_bar else contextlib.nullcontext():
        for rows in _batches(prefixes, config.batch_size, by_length):
            gens = [torch.Generator().manual_seed(sample_seed(config.seed, indices[i])) for i in rows]
            start_rows = None if init is None else init[rows]
            out, filled_at, base, extra, steps = _generate_batch(model, sampler, config, [prefixes[i] for i in rows],
                                                                 gens, start_rows)
            for i, row_tokens, row_history in zip(rows, out.tolist(), filled_at.tolist(), strict=True):
                all_tokens[i], history[i] = row_tokens, row_history
            counters.base_passes += base.sum().item()
            counters.extra_passes += extra.sum().item()
            counters.steps += steps.sum().item()
            bar.update(len(rows))
    counters.wall_time_s = time.perf_counter() - start
    n = max(1, len(prompts))
    counters.base_passes /= n
    counters.extra_passes /= n
    counters.steps /= n
    counters.generated_tokens = config.length * len(prompts)
    if init is not None:
        counters.generated_tokens -= int((init != model.spec.mask_id).sum())
    stops = stop_ids(model)
    texts = [model.tokenizer.decode(cut_at_stop(t, stops)) for t in all_tokens]
    return Generation(prompts=prompts, texts=texts, tokens=all_tokens,
                      history=history if config.record_history else None, counters=counters,
                      batched_by_length=by_length)


def _check_run(model: DiffusionLM, sampler: Sampler, config: SamplingConfig, prefixes: list[list[int]]) -> None:
    """What makes a whole run fail, checked before any sampling (and before a progress bar starts)."""
    fixed_k = getattr(sampler, "tokens_per_step", None)
    schedule_ks = {k for size in config.block_sizes() for k in config.schedule(size)}
    if fixed_k is not None and (config.tokens_per_step != fixed_k or max(schedule_ks) > fixed_k):
        raise ValueError(f"the {sampler.name} sampler unmasks {fixed_k} token per step; "
                         f"got tokens_per_step={config.tokens_per_step}, steps={config.steps}")
    build_canvas(model, [max(prefixes, key=len, default=[])], config.length)
    if config.kv_cache is not None and not hasattr(model, "windowed"):
        raise ValueError(f"kv_cache={config.kv_cache!r} needs a built-in model (remote model code computes every "
                         "position of every pass)")


def generate_parts(model: DiffusionLM, sampler: Sampler, config: SamplingConfig,
                   prompts: Sequence[str] | None = None, num: int | None = None,
                   part_size: int = 4096) -> Iterator[tuple[int, Generation]]:
    """`generate` in parts of at most `part_size` samples, yielded as (index of the part's first sample, part),
    so a large run never holds every sample in memory. The samples are those of one `generate` call (each
    sample's generator depends on its index only); one progress bar covers the whole run."""
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    if prompts is None and (num is None or num < 1):
        raise ValueError("give prompts or a positive number of samples")
    if prompts is None and config.chat:
        raise ValueError("chat=True (--chat) templates prompts; give prompts")
    total = len(prompts) if prompts is not None else num
    _check_run(model, sampler, config, encode_prompts(model, prompts if prompts is not None else [""], config.chat))
    bar = tqdm(total=total, disable=not config.progress, desc=f"sample {sampler.name}", dynamic_ncols=True)
    with bar:
        for offset in range(0, total, part_size):
            size = min(part_size, total - offset)
            part = None if prompts is None else list(prompts[offset:offset + size])
            yield offset, generate(model, sampler, config, prompts=part, num=size if part is None else None,
                                   index_offset=offset, progress_bar=bar)


def _batches(prefixes: Sequence[Sequence[int]], batch_size: int, by_length: bool) -> list[list[int]]:
    """Row indices of each batch: in order, or, for a model that ignores padding, grouped by prefix length
    (each batch holds one length, so no row is padded)."""
    order = list(range(len(prefixes)))
    if not by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(len(prefixes[i]), []).append(i)
    return [rows[i:i + batch_size] for rows in groups.values() for i in range(0, len(rows), batch_size)]


def _generate_batch(model: DiffusionLM, sampler: Sampler, config: SamplingConfig,
                    prefixes: list[list[int]], gens: list[torch.Generator], init: torch.Tensor | None = None):
    tokens, attention, start = build_canvas(model, prefixes, config.length)
    if init is not None:
        tokens[:, start:] = init.to(tokens.device)
    batch = tokens.shape[0]
    filled_at = torch.full((batch, config.length), -1, dtype=torch.long)
    base = torch.zeros(batch, dtype=torch.long)
    extra = torch.zeros(batch, dtype=torch.long)
    steps = torch.zeros(batch, dtype=torch.long)
    mask_id = model.spec.mask_id
    stops = torch.tensor(sorted(stop_ids(model)), device=tokens.device) if config.stop_at_text_end else None
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device) if stops is None else \
        text_decided(tokens[:, start:], stops, mask_id)  # pre-filled text (init) may be decided already
    step_index = 0
    block_start = start
    view = model.windowed() if config.kv_cache is not None else None
    for block_size in config.block_sizes():
        region = torch.zeros_like(tokens, dtype=torch.bool)
        region[:, block_start:block_start + block_size] = True
        schedule = config.schedule(block_size)
        if view is not None and ((tokens == mask_id) & region & ~done[:, None]).any():  # nothing to fill: no record
            end = block_start + block_size if config.kv_cache == "dual" else tokens.shape[1]
            view.record(tokens, attention, slice(block_start, end))
        for k in itertools.count():
            eligible = (tokens == mask_id) & region & ~done[:, None]
            remaining = eligible.sum(-1)
            active = (remaining > 0).nonzero().squeeze(-1)
            if active.numel() == 0:
                break
            # A fixed-K step writes the schedule's count; for an adaptive one K is a cap, the same at every step (the
            # schedule's last entry, the block's leftover, would cap every step after it at less).
            want = schedule[min(k, len(schedule) - 1)] if sampler.follows_budget else max(schedule)
            ctx = StepContext(model=model if view is None else view.select(active), tokens=tokens[active],
                              attention_mask=attention[active],
                              eligible=eligible[active], budget=remaining[active].clamp(max=want),
                              generators=[gens[i] for i in active.tolist()], choice=config.choice,
                              step_index=step_index)
            result = sampler.step(ctx)
            if config.validate:
                check_step(ctx, result, sampler.follows_budget)
            tokens[active] = torch.where(result.fill, result.tokens, ctx.tokens)
            rows = active.cpu()
            # A row's own step count, so the history does not depend on how long other rows took per block.
            filled_at[rows] = torch.where(result.fill[:, start:].cpu(), steps[rows][:, None], filled_at[rows])
            base[rows] += result.base_passes
            extra[rows] += result.extra_passes
            steps[rows] += 1
            step_index += 1
            if stops is not None:
                done[active] = text_decided(tokens[active, start:], stops, mask_id)
        block_start += block_size
    if stops is not None:  # positions after a decided text's end were never sampled
        filler = model.spec.eos_id if model.spec.pad_id is None else model.spec.pad_id
        tokens[:, start:] = tokens[:, start:].masked_fill(done[:, None] & (tokens[:, start:] == mask_id), filler)
    return tokens[:, start:].cpu(), filled_at, base, extra, steps


def text_decided(generated: torch.Tensor, stops: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B,) True where a row's text can no longer change: a stop token with no mask before it (`cut_at_stop` ends
    the text at the first stop, so positions after it do not matter)."""
    is_stop = torch.isin(generated, stops)
    before_first_stop = is_stop.cumsum(-1) == 0
    return is_stop.any(-1) & ~((generated == mask_id) & before_first_stop).any(-1)
