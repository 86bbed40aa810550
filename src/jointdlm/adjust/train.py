"""Training the ADJUST head by KL distillation from the frozen base on its own K=1 trajectories.

One training example: a trajectory, a state x_t on it (j positions unmasked), a depth n in 1..rollout-1
drawn with P(n) proportional to 0.5^(n-1). The head starts from the base's hidden states at x_t, is fed the
trajectory's next n true tokens one pass at a time (teacher forcing), and after the n-th pass is fitted to
the base's own distributions on x_t + those n tokens:  KL(p_base(. | x_t + n) || p_head), averaged over
the positions still masked. Only the head trains; the base is checked bit for bit at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.protocol import DiffusionLM
from ..sampling.rules import rank_of
from ..validation import require_choice, require_positive
from .head import INPUT_FORMS, OUTPUT_LAYERS, AdjustHead, AdjustHeadConfig
from .trajectories import Trajectories, load_trajectories

STATE_FILE = "adjust_trainer_state.pt"
LOG_FILE = "adjust_log.jsonl"


@dataclass(frozen=True)
class AdjustTrainConfig:
    max_steps: int = 1500
    rollout: int = 4
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    input_form: str = "concat"
    output_layer: str = "gain"
    """How the head's update reaches the hidden state: "gain" (a zero-init RMSNorm gain) or "linear" (a zero-init
    d x d map, which learns where the signal is sparse; see adjust/head.py)."""
    eval_every: int = 250
    save_every: int = 250
    heldout: int = 64
    remask_fraction: float = 0.0
    """Share of training rows built by re-masking the final sample at a random ratio (see `make_batch`)."""
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.rollout < 2:
            raise ValueError(f"rollout must be >= 2 (depths 1..rollout-1), got {self.rollout}")
        require_choice("input_form", self.input_form, INPUT_FORMS)
        require_choice("output_layer", self.output_layer, OUTPUT_LAYERS)
        require_positive(self, ("max_steps", "batch_size", "eval_every", "save_every"))
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.heldout < 0:
            raise ValueError(f"heldout must be >= 0, got {self.heldout}")
        if not 0.0 <= self.remask_fraction <= 1.0:
            raise ValueError(f"remask_fraction must be in [0, 1], got {self.remask_fraction}")


def depth_probabilities(rollout: int) -> torch.Tensor:
    weights = torch.tensor([0.5 ** (n - 1) for n in range(1, rollout)])
    return weights / weights.sum()


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, masked: torch.Tensor,
              banned: list[int]) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student), on the distributions samplers draw from."""
    def logprobs(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().clone()
        logits[..., banned] = -1e9
        return torch.log_softmax(logits, dim=-1)

    t, s = logprobs(teacher_logits), logprobs(student_logits)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * masked).sum() / masked.sum().clamp(min=1)


@dataclass
class Batch:
    tokens: torch.Tensor     # (B, P + L) canvas at state x_t
    attention: torch.Tensor  # (B, P + L)
    steps: list[torch.Tensor]  # n boolean (B, P + L) masks: the position written at each teacher-forced pass
    targets: torch.Tensor    # (B, P + L) the trajectory's final tokens (prefix included)
    by_rule: torch.Tensor | None = None  # (B,) rows whose next positions follow the base's confidence


def make_batch(data: Trajectories, rows: torch.Tensor, states: torch.Tensor, depth: int, mask_id: int,
               device: str, remask: torch.Tensor | None = None, gen: torch.Generator | None = None) -> Batch:
    """Exact trajectory states; rows flagged in `remask` instead re-mask the final sample at a random ratio
    (states that K>1 sampling reaches but K=1 trajectories never visit), their next positions then chosen by
    the base's confidence inside `RolloutLoss`."""
    prefix, order, final = data.prefix[rows], data.order[rows], data.tokens[rows]
    width = prefix.shape[1]
    attention = torch.cat([(torch.arange(width) >= width - data.prefix_len[rows][:, None]).long(),
                           torch.ones_like(final)], dim=1)
    targets = torch.cat([prefix, final], dim=1)
    known = order < states[:, None]
    if remask is not None and remask.any():
        ratio = torch.rand(len(rows), 1, generator=gen)
        hidden_again = torch.rand(final.shape, generator=gen) < ratio
        remask = remask & (hidden_again.sum(-1) > depth)
        known = torch.where(remask[:, None], ~hidden_again, known)
    tokens = torch.cat([prefix, torch.where(known, final, torch.full_like(final, mask_id))], dim=1)
    pad = torch.zeros(len(rows), width, dtype=torch.bool)
    steps = [torch.cat([pad, order == (states[:, None] + m)], dim=1).to(device) for m in range(depth)]
    by_rule = remask.to(device) if remask is not None and remask.any() else None
    return Batch(tokens.to(device), attention.to(device), steps, targets.to(device), by_rule)


def confidence_steps(logits: torch.Tensor, masked: torch.Tensor, depth: int, banned: list[int]) -> list[torch.Tensor]:
    """The next `depth` positions the confidence rule would fill from these logits, one mask per pass."""
    logits = logits.float().clone()
    logits[..., banned] = -torch.inf
    confidence = torch.log_softmax(logits, dim=-1).max(-1).values.masked_fill(~masked, -torch.inf)
    ranks = rank_of(confidence)
    return [(ranks == m) & masked for m in range(depth)]


class RolloutLoss(nn.Module):
    """The whole teacher-forced rollout as one module call, so DDP sees one forward per step."""

    def __init__(self, head: AdjustHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, base: DiffusionLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (KL of the head, KL of the stale base marginals) after len(batch.steps) passes."""
        with torch.no_grad():
            start = base.forward(batch.tokens, batch.attention)
        hidden, tokens = start.hidden, batch.tokens
        steps = batch.steps
        if batch.by_rule is not None:
            by_rule = confidence_steps(start.logits, tokens == base.spec.mask_id, len(steps), base.spec.never_sampled())
            steps = [torch.where(batch.by_rule[:, None], r, s) for r, s in zip(by_rule, steps, strict=True)]
        for written in steps:
            tokens = torch.where(written, batch.targets, tokens)
            hidden, logits = self.head(base, tokens, batch.attention, hidden)
        with torch.no_grad():
            teacher = base.forward(tokens, batch.attention).logits
        still_masked = tokens == base.spec.mask_id
        banned = base.spec.never_sampled()
        stale = masked_kl(teacher, start.logits, still_masked, banned)
        return masked_kl(teacher, logits, still_masked, banned), stale


def draw_examples(data: Trajectories, batch_size: int, depth: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Trajectories and states j with at least one position still masked after `depth` more tokens."""
    length = data.tokens.shape[1]
    rows = torch.randint(len(data), (batch_size,), generator=gen)
    states = torch.randint(0, length - depth, (batch_size,), generator=gen)
    return rows, states


@torch.no_grad()
def evaluate(loss_module: RolloutLoss, base: DiffusionLM, data: Trajectories, rollout: int, device: str,
             examples: int = 256, seed: int = 4321) -> dict[int, dict[str, float]]:
    """Held-out KL(teacher || head) and KL(teacher || stale marginals) at every depth, fixed draws."""
    results = {}
    length = data.tokens.shape[1]
    for depth in range(1, min(rollout, length)):
        gen = torch.Generator().manual_seed(seed + depth)
        head_kl = stale_kl = 0.0
        done = 0
        while done < examples:
            n = min(64, examples - done)
            rows, states = draw_examples(data, n, depth, gen)
            h, s = loss_module(base, make_batch(data, rows, states, depth, base.spec.mask_id, device))
            head_kl += h.item() * n
            stale_kl += s.item() * n
            done += n
        results[depth] = {"head_kl": head_kl / examples, "stale_kl": stale_kl / examples}
    return results


def _lr(step: int, cfg: AdjustTrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def train_adjust(base: DiffusionLM, trajectories_dir: str | Path, out: str | Path,
                 cfg: AdjustTrainConfig) -> AdjustHead:
    """Train (or resume) an ADJUST head for `base` on trajectories collected from it."""
    from accelerate import Accelerator

    out = Path(out)
    data = load_trajectories(trajectories_dir)
    if data.fingerprint != base.fingerprint():
        raise ValueError(f"trajectories in {trajectories_dir} come from base {data.fingerprint}, "
                         f"not from this base ({base.fingerprint()})")
    if data.tokens.shape[1] < 2:
        raise ValueError("trajectories must have at least 2 generated tokens")
    heldout_n = min(cfg.heldout, len(data) // 5)
    train_data, heldout = data.split(heldout_n) if heldout_n else (data, data)

    accelerator = Accelerator(cpu=cfg.device == "cpu")
    device = str(accelerator.device)
    base_fingerprint = base.fingerprint()
    state_path = out / STATE_FILE
    head_config = AdjustHeadConfig.for_base(base, cfg.input_form, cfg.output_layer)
    torch.manual_seed(cfg.seed)
    head = AdjustHead(head_config)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
    step = 0
    identity = {"config": _comparable(asdict(cfg)), "base_fingerprint": base_fingerprint,
                "trajectories": _trajectory_identity(data), "num_processes": accelerator.num_processes}
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        problems = _resume_problems(state, identity)
        if problems:
            raise ValueError(f"{out} holds a training run that cannot be resumed with these settings "
                             f"({'; '.join(problems)}); use a new --out, or the same flags, base and trajectories")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        # clone(): a row saved as a view of the gathered (world, n) tensor keeps a storage offset, and
        # Generator.set_state reads such a tensor from the wrong place (invalid state or a crash).
        gen.set_state(state["generators"][accelerator.process_index].clone())
        step = state["step"]
    loss_module, optimizer = accelerator.prepare(RolloutLoss(head), optimizer)
    depth_p = depth_probabilities(cfg.rollout)
    mask_id = base.spec.mask_id

    def checkpoint() -> None:
        gens = accelerator.gather_for_metrics(gen.get_state()[None]) if accelerator.num_processes > 1 \
            else gen.get_state()[None]
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            accelerator.unwrap_model(loss_module).head.save_pretrained(out, {"training": asdict(cfg), "step": step})
            tmp = state_path.with_name(STATE_FILE + ".tmp")
            torch.save({"head": accelerator.unwrap_model(loss_module).head.state_dict(),
                        "optimizer": optimizer.state_dict(), "generators": [g.clone() for g in gens], "step": step,
                        "config": asdict(cfg), "base_fingerprint": base_fingerprint,
                        "trajectories": identity["trajectories"], "num_processes": accelerator.num_processes}, tmp)
            os.replace(tmp, state_path)
        accelerator.wait_for_everyone()

    bar = tqdm(total=cfg.max_steps, initial=step, desc="train-adjust", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    running = None
    started = time.time()
    log = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / LOG_FILE, "a")
    while step < cfg.max_steps:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        depth = int(torch.multinomial(depth_p, 1, generator=gen).item()) + 1
        depth = min(depth, train_data.tokens.shape[1] - 1)
        rows, states = draw_examples(train_data, cfg.batch_size, depth, gen)
        remask = torch.rand(cfg.batch_size, generator=gen) < cfg.remask_fraction if cfg.remask_fraction else None
        batch = make_batch(train_data, rows, states, depth, mask_id, device, remask=remask, gen=gen)
        loss, stale = loss_module(base, batch)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(loss_module.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        pair = (loss.item(), stale.item())
        running = pair if running is None else tuple(0.95 * r + 0.05 * p for r, p in zip(running, pair, strict=True))
        bar.update(1)
        bar.set_postfix(kl=f"{running[0]:.4f}", stale_kl=f"{running[1]:.4f}")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            scores = evaluate(accelerator.unwrap_model(loss_module), base, heldout, cfg.rollout, device)
            if log is not None:
                log.write(json.dumps({"step": step, "heldout": scores, "elapsed_s": round(time.time() - started, 1)})
                          + "\n")
                log.flush()
                summary = "  ".join(f"depth {d}: head {v['head_kl']:.4f} vs stale {v['stale_kl']:.4f}"
                                    for d, v in scores.items())
                bar.write(f"step {step} held-out KL  {summary}")
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            checkpoint()
    bar.close()
    if log is not None:
        log.close()
    if not (out / "adjust.safetensors").exists():
        checkpoint()
    base_after = _recompute_fingerprint(base)
    if base_after != base_fingerprint:
        raise AssertionError("the base model changed during ADJUST training; it must stay frozen")
    head = accelerator.unwrap_model(loss_module).head
    return head.eval().requires_grad_(False)


def _comparable(config: dict) -> dict:
    """Fields that may change between a run and its resumption do not count."""
    return {k: v for k, v in config.items() if k not in ("progress", "max_steps", "eval_every", "save_every")}


def _trajectory_identity(data: Trajectories) -> dict:
    """What makes a trajectory collection the same data (its progress flag does not)."""
    return {"fingerprint": data.fingerprint, **{k: v for k, v in asdict(data.config).items() if k != "progress"}}


def _resume_problems(state: dict, wanted: dict) -> list[str]:
    """Why a saved trainer state cannot be continued by this run (empty when it can).

    State files written before a key was recorded are not held to that key, and a config field added since
    counts as its default there (new fields default to the old behaviour)."""
    problems = []
    defaults = {f.name: f.default for f in fields(AdjustTrainConfig)}
    old_cfg, new_cfg = _comparable(state["config"]), wanted["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        old = old_cfg.get(key, defaults.get(key))
        if old != new_cfg.get(key):
            problems.append(f"{key}={old!r} there, {new_cfg.get(key)!r} now")
    if state.get("base_fingerprint", wanted["base_fingerprint"]) != wanted["base_fingerprint"]:
        problems.append(f"base model {state['base_fingerprint']} there, {wanted['base_fingerprint']} now")
    if state.get("trajectories", wanted["trajectories"]) != wanted["trajectories"]:
        problems.append("trained on a different trajectory collection")
    saved_procs = state.get("num_processes", len(state["generators"]))
    if saved_procs != wanted["num_processes"]:
        problems.append(f"{saved_procs} training process(es) there, {wanted['num_processes']} now")
    return problems


def _recompute_fingerprint(base: DiffusionLM) -> str:
    if hasattr(base, "_fingerprint"):
        base._fingerprint = None
    return base.fingerprint()


def final_heldout(out: str | Path) -> dict | None:
    """The last held-out evaluation written by a training run."""
    path = Path(out) / LOG_FILE
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[-1]["heldout"] if lines else None

