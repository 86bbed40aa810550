"""Pre-training the built-in models: the MDLM objective (or next-token for the causal scorer).

MDLM objective: t ~ U(0, 1) (stratified across the batch, which lowers the variance of the 1/t weight),
each token masked with probability t, cross-entropy on masked positions weighted by 1/t. BOS is never
masked; EOS and the padding after it are, so the model learns where a document ends.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..outputs import check_output_dir
from ..validation import require_choice, require_finite, require_positive
from .mdlm import PRESETS, BuiltinModel, MaskedDiffusionTransformer, MDLMConfig, atomic_write_json, read_config
from .tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, BPETokenizer

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"


PRESET_LR = {"tiny": 3e-3, "deep": 3e-3, "small": 5e-4, "base": 3e-4, "large": 3e-4}
"""The peak learning rate each preset trains at unless told (docs/results.md §10). At 3e-3, 2,000 steps leave
seating's exclusion unlearned on tiny, deep and small (K=1 validity 0.39-0.44, near the 0.41 of guests drawn
independently; a longer warm-up, a 4x batch or 4x the steps left small at 0.43-0.54) and binding's copies on tiny
and small (0.33, 0.07); at 5e-4 each learns them (0.82-0.95). `small`, the default preset, takes 5e-4: it costs
choice 0.03 at 2,000 steps (nothing at the 6,000 of `DEFAULT_STEPS`: 0.988). `tiny` and `deep` keep 3e-3,
which the demo and the test suite were measured with and at which tiny learns choice faster (0.984 against
0.892 at 5e-4); give them `lr=5e-4` for languages of copies or exclusions. The wide presets take
the 3e-4 MDLM was trained with (not measured here)."""


DEFAULT_STEPS = {"mdlm": 6000, "ar": 2000}
"""Training steps unless told. A diffusion base at `small`'s rate samples markedly better at 6,000 steps than at
2,000 on every toy language and the bracket corpus measured (K=1 validity 0.956 -> 0.988 choice, 0.860 -> 0.980
binding, 0.946 -> 0.980 seating, 0.988 -> 0.996 permutation, 0.58 -> 0.81 brackets), while its held-out loss moved
by 0.2-4% and no convergence warning fired (docs/results.md §10, `benchmarks/convergence_study.py`): 3.5-5.5 min
on 2 CPU cores at these canvases. The causal scorer keeps 2,000 (not measured; a small corpus it memorises)."""


@dataclass
class PretrainConfig:
    preset: str = "small"
    objective: str = "mdlm"
    max_steps: int | None = None
    """None: the run's own target when `pretrain` resumes one (so re-running a command that finished does nothing,
    whatever the default has since become), else `DEFAULT_STEPS` for the objective (`target_steps`)."""
    batch_size: int = 64
    lr: float | None = None
    """Peak learning rate; None: the preset's (`PRESET_LR`)."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seq_len: int = 0
    vocab_size: int = 1024
    eval_every: int = 250
    save_every: int = 500
    heldout_fraction: float = 0.05
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    tokenizer_from: str | None = None
    """A model directory whose tokenizer (and canvas length) to reuse, e.g. so a causal scorer shares the
    diffusion model's tokenizer."""
    prompt_separator: str | None = None
    """Documents are PROMPT SEPARATOR ANSWER; train on the answer given the prompt (mdlm objective only)."""
    random_canvas: bool = False
    """Cut each batch's canvas at a random length (never inside a document), so the model does not tie where
    an answer ends to where the canvas ends: prompted sampling gives every prompt the same number of masks,
    so canvases end at different distances from the prompt."""

    def __post_init__(self) -> None:
        require_choice("preset", self.preset, PRESETS)
        require_choice("objective", self.objective, ("mdlm", "ar"))
        if self.lr is None:
            self.lr = PRESET_LR[self.preset]
        require_positive(self, ("batch_size", "eval_every", "save_every")
                         + (("max_steps",) if self.max_steps is not None else ()))
        require_finite(self, ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "heldout_fraction"))
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be >= 300 (256 bytes + special tokens + merges)")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError("heldout_fraction must be in (0, 0.5)")
        if self.prompt_separator is not None:
            if not self.prompt_separator.strip():
                raise ValueError("prompt_separator must contain a non-space character")
            if self.objective != "mdlm":
                raise ValueError("prompt_separator applies to the mdlm objective only")


def read_documents(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    docs = [line.strip() for line in text.splitlines()]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"corpus {path} is empty (no non-blank lines)")
    return docs


def split_prompt(doc: str, separator: str) -> tuple[str, str]:
    """(prompt including the separator, answer) at the first occurrence of the separator."""
    cut = doc.find(separator)
    if cut < 0:
        raise ValueError(f"document {doc[:60]!r} has no prompt separator {separator!r}")
    cut += len(separator)
    return doc[:cut], doc[cut:]


def encode_documents(tokenizer: BPETokenizer, docs: list[str], seq_len: int,
                     prompt_separator: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, seq_len) rows of BOS + tokens + EOS + PAD..., cut at seq_len, and per row how many leading tokens
    are context that is never masked: BOS, plus the prompt when documents are prompt/answer pairs."""
    rows = torch.full((len(docs), seq_len), PAD_ID, dtype=torch.long)
    context = torch.ones(len(docs), dtype=torch.long)
    for i, doc in enumerate(docs):
        if prompt_separator is None:
            ids = [BOS_ID, *tokenizer.encode(doc), EOS_ID][:seq_len]
        else:
            prompt, answer = split_prompt(doc, prompt_separator)
            prompt_ids = [BOS_ID, *tokenizer.encode(prompt)]
            if len(prompt_ids) >= seq_len:
                raise ValueError(f"prompt of {doc[:60]!r} fills the whole canvas of {seq_len} tokens")
            ids = [*prompt_ids, *tokenizer.encode(answer), EOS_ID][:seq_len]
            context[i] = len(prompt_ids)
        rows[i, : len(ids)] = torch.tensor(ids)
    return rows, context


AUTO_SEQ_LEN_CAP = 128


def auto_seq_len(tokenizer: BPETokenizer, docs: list[str], cap: int = AUTO_SEQ_LEN_CAP) -> int:
    """Long enough for 95% of documents with BOS and EOS, rounded up to a multiple of 8, at most `cap`; a warning
    when the cap cuts more than 5% of them (a structured corpus whose documents all run past it would otherwise
    train and sample a canvas too short for any valid string, with no word said)."""
    lengths = sorted(len(tokenizer.encode(d)) + 2 for d in docs[:5000])
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    if p95 > cap:
        cut = sum(n > cap for n in lengths) / len(lengths)
        print(f"warning: {cut:.0%} of the documents are longer than the canvas of {cap} tokens (BOS and EOS "
              f"included) and are cut to it, so their ends and EOS are never learned; --seq-len up to "
              f"{lengths[-1]} keeps them whole (at that length's cost)", file=sys.stderr)
    return min(cap, 8 * math.ceil(p95 / 8))


def mdlm_loss(net: MaskedDiffusionTransformer, batch: torch.Tensor, context: torch.Tensor,
              generator: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    """The 1/t-weighted masked cross-entropy, averaged over the positions that may be masked. Logits are computed
    only at the masked positions (the output projection is most of a small model's cost)."""
    b, t = batch.shape
    offsets = torch.rand((), generator=generator, device=batch.device)
    times = eps + (1 - eps) * ((offsets + torch.arange(b, device=batch.device) / b) % 1.0)
    maskable = torch.arange(t, device=batch.device)[None, :] >= context[:, None]
    masked = (torch.rand(b, t, generator=generator, device=batch.device) < times[:, None]) & maskable
    noisy = torch.where(masked, torch.full_like(batch, MASK_ID), batch)
    logits = net.head(net.trunk(noisy)[masked])
    ce = F.cross_entropy(logits, batch[masked], reduction="none")
    return (ce / times[:, None].expand(b, t)[masked]).sum() / maskable.sum()


def ar_loss(net: MaskedDiffusionTransformer, batch: torch.Tensor, context: torch.Tensor,
            generator: torch.Generator) -> torch.Tensor:
    logits, _ = net(batch)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], ignore_index=PAD_ID)


def random_cut(batch: torch.Tensor, generator: torch.Generator) -> int:
    """A canvas length between the batch's longest document (through its EOS) and the full canvas."""
    used = int((batch != PAD_ID).sum(-1).max())
    high = batch.shape[1]
    return used + int(torch.randint(high - used + 1, (), generator=generator, device=batch.device))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_loss(net: MaskedDiffusionTransformer, data: torch.Tensor, context: torch.Tensor, objective: str,
                 batch_size: int = 256) -> float:
    """Fixed masks (seed 1234), so successive evaluations are comparable."""
    gen = torch.Generator(device=data.device).manual_seed(1234)
    loss_fn = mdlm_loss if objective == "mdlm" else ar_loss
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        chunk = data[start:start + batch_size]
        total += loss_fn(net, chunk, context[start:start + batch_size], gen).item() * len(chunk)
        count += len(chunk)
    net.train(was_training)
    return total / count


def _training_extra(cfg: PretrainConfig, corpus: Path, digest: str) -> dict:
    return {"pretrain": {**asdict(cfg), "corpus": str(corpus), "corpus_digest": digest}}


def corpus_digest(docs: list[str]) -> str:
    """What a resumed run checks its corpus against (the documents, not the file's path, which may move)."""
    return hashlib.sha256("\n".join(docs).encode()).hexdigest()[:16]


RESUME_FIELDS = ("preset", "objective", "vocab_size", "seq_len", "tokenizer_from", "prompt_separator", "seed")
"""Settings a resumed run cannot change: the saved network and tokenizer are used whatever they say, and the seed
draws the held-out split (another would mix two held-out sets in one loss curve)."""


def target_steps(cfg: PretrainConfig, saved: int | None = None) -> int:
    """How many steps `cfg` trains to: its max_steps; unless given, the target of the run being resumed (`saved`,
    from its config.json), else `DEFAULT_STEPS`. A run started under an older default is continued to that
    target, not silently to today's."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return saved if saved is not None else DEFAULT_STEPS[cfg.objective]


def _resume_problems(saved: dict, cfg: PretrainConfig, step: int, digest: str) -> list[str]:
    """Why the run saved with pre-training settings `saved` cannot be continued by `cfg` on documents of `digest`
    (empty when it can)."""
    problems = [f"{key}={saved[key]!r} there, {getattr(cfg, key)!r} now" for key in RESUME_FIELDS
                if key in saved and saved[key] != getattr(cfg, key)]
    if saved.get("corpus_digest", digest) != digest:
        problems.append(f"trained on another corpus ({saved.get('corpus')})")
    if step > cfg.max_steps:
        problems.append(f"trained {step} steps there, max_steps={cfg.max_steps} now")
    return problems


STILL_FALLING = 0.05
"""A held-out loss that fell by more than this share over a run's last quarter says the base has not converged:
the binding base at 2,000 steps with the rate before §10 fell 19% there (K=1 validity 0.070; 0.744 once pre-trained 4x
longer); bases that had learned their language 0.8-2.3% (docs/results.md §10). It says a base is still learning,
not that it has learned: 2,000-step bases that sampled far worse than at 6,000 had losses within 4% of those
(`DEFAULT_STEPS`)."""


def convergence(log_path: str | Path) -> dict | None:
    """How the held-out loss moved over the last quarter of the steps logged (all runs into one --out); None with
    fewer than four evaluations."""
    path = Path(log_path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    curve = [(r["step"], r["heldout_loss"]) for r in rows if r.get("heldout_loss") is not None]
    if len(curve) < 4:
        return None
    (from_step, first), (to_step, last) = last_quarter(curve)
    drop = (first - last) / max(abs(first), 1e-12)
    return {"from_step": from_step, "to_step": to_step, "heldout_from": first, "heldout_to": last,
            "drop": round(drop, 4), "still_falling": drop > STILL_FALLING}


def last_quarter(curve: list[tuple[int, float]]) -> tuple[tuple[int, float], tuple[int, float]]:
    """The two (step, held-out loss) evaluations `convergence` compares: the last at or before three quarters of
    the last step (the first evaluation if none is), and the last."""
    before = [point for point in curve if point[0] <= 0.75 * curve[-1][0]] or curve[:1]
    return before[-1], curve[-1]


def format_convergence(done: dict) -> str | None:
    """The warning `jointdlm pretrain` prints for a base whose held-out loss was still falling, or None."""
    moved = done.get("heldout")
    if not moved or not moved["still_falling"]:
        return None
    return (f"warning: held-out loss still falling ({moved['heldout_from']:.3f} -> {moved['heldout_to']:.3f}, "
            f"-{moved['drop']:.0%} over steps {moved['from_step']}-{moved['to_step']}): the base has not "
            f"converged, so its K=1 samples, which heads are trained to match, are not yet what it can do; run "
            f"the same command with a larger --max-steps (e.g. {2 * done['step']}) to continue this one")


def pretrain(corpus: str | Path, out: str | Path, cfg: PretrainConfig) -> BuiltinModel:
    """Train (or resume training of) a built-in model on a one-document-per-line corpus."""
    from .loading import resolve_device

    corpus, out = Path(corpus), Path(out)
    resolve_device(cfg.device)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    check_output_dir(out)
    docs = read_documents(corpus)
    if len(docs) < 2:
        raise ValueError(f"corpus {corpus} holds one document: pre-training holds some out to measure its held-out "
                         "loss; give at least two (one per line)")
    digest = corpus_digest(docs)
    torch.manual_seed(cfg.seed)
    state_path = out / STATE_FILE
    resume = state_path.exists()
    # The saved run's settings (absent in models saved without them); its step target unless max_steps is given.
    saved = (read_config(out / "config.json").get("pretrain") or {}) if resume else {}
    cfg = replace(cfg, max_steps=target_steps(cfg, saved.get("max_steps")))
    if resume:
        state = torch.load(state_path, map_location=cfg.device, weights_only=True)  # tensors only: no pickle code
        problems = _resume_problems(saved, cfg, state["step"], digest)
        if problems:
            raise ValueError(f"--out {out} holds a pre-training run that cannot be resumed with these settings "
                             f"({'; '.join(problems)}); use a new --out, or the flags it was trained with")
        model = BuiltinModel.load(out)
        tokenizer, net = model.tokenizer, model.net
        net.requires_grad_(True)
        seq_len = net.config.max_length
    else:
        if cfg.tokenizer_from:
            tokenizer = BPETokenizer.load(cfg.tokenizer_from)
            donor = read_config(Path(cfg.tokenizer_from) / "config.json")
            seq_len = cfg.seq_len or donor["max_length"]
        else:
            tokenizer = BPETokenizer.train(docs, cfg.vocab_size)
            seq_len = cfg.seq_len or auto_seq_len(tokenizer, docs)
        net = MaskedDiffusionTransformer(MDLMConfig(
            vocab_size=tokenizer.vocab_size, max_length=seq_len, causal=cfg.objective == "ar", **PRESETS[cfg.preset]))
    net.to(cfg.device).train()

    data, context = encode_documents(tokenizer, docs, seq_len, cfg.prompt_separator)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # only once the corpus is known to encode, so bad input leaves nothing
    split_gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data), generator=split_gen)
    n_held = max(1, min(1000, int(cfg.heldout_fraction * len(data))))
    heldout, train = data[order[:n_held]].to(cfg.device), data[order[n_held:]].to(cfg.device)
    heldout_context, train_context = context[order[:n_held]].to(cfg.device), context[order[n_held:]].to(cfg.device)

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    batch_gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
    step = 0
    if resume:
        optimizer.load_state_dict(state["optimizer"])
        batch_gen.set_state(state["generator"].cpu())  # map_location moved it; a generator takes a CPU state
        step = state["step"]

    loss_fn = mdlm_loss if cfg.objective == "mdlm" else ar_loss
    model = BuiltinModel(net, tokenizer)

    def checkpoint(step: int) -> None:
        model.save(out, _training_extra(cfg, corpus, digest))
        tmp = state_path.with_name(STATE_FILE + ".tmp")
        torch.save({"optimizer": optimizer.state_dict(), "generator": batch_gen.get_state(), "step": step}, tmp)
        os.replace(tmp, state_path)

    if resume and step >= cfg.max_steps and cfg.progress:
        print(f"{out} holds a finished {step:,}-step pre-training run: nothing to train (a larger max_steps "
              f"continues it)", file=sys.stderr)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not cfg.progress, desc=f"pretrain {cfg.objective}",
               dynamic_ncols=True)
    try:
        start_time, running = time.time(), None
        with bar, open(out / LOG_FILE, "a") as log:  # the bar's line ends even when a step fails
            while step < cfg.max_steps:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                idx = torch.randint(len(train), (cfg.batch_size,), generator=batch_gen, device=cfg.device)
                batch = train[idx]
                if cfg.random_canvas:
                    batch = batch[:, :random_cut(batch, batch_gen)]
                loss = loss_fn(net, batch, train_context[idx], batch_gen)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                optimizer.step()
                step += 1
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}")
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    held = heldout_loss(net, heldout, heldout_context, cfg.objective)
                    record = {"step": step, "train_loss": running, "heldout_loss": held,
                              "elapsed_s": round(time.time() - start_time, 1)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    tqdm.write(f"step {step}: train {running:.4f}  held-out {held:.4f}", file=sys.stderr)
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    checkpoint(step)
    except BaseException:
        if created and not state_path.exists():
            shutil.rmtree(out, ignore_errors=True)  # a first run that failed before a checkpoint leaves nothing
        raise
    if step == 0 or not (out / "model.safetensors").exists():
        checkpoint(step)
    net.eval().requires_grad_(False)
    atomic_write_json(out / "training_done.json", {"step": step, "max_steps": cfg.max_steps,
                                                   "heldout": convergence(out / LOG_FILE)})
    return model
