"""ADJUST training data: K=1 trajectories of the frozen base model, and on-policy states.

A trajectory is one sequential (one token per pass) sample drawn with the base model's own unmasking rule
and temperature. It is fully described by its prefix (BOS + prompt), its final tokens and the order in which
the generated positions were filled, so only those are stored: the state after j unmaskings is "final token
where order < j, mask elsewhere". Trajectory j is seeded by (seed, j), and shards are written atomically, so
collection can be split across processes, killed and resumed, always giving the same data.

On-policy collections (`policy_tokens_per_step` > 1) start each trajectory with the K>1 sampler that will
use the head (naive parallel, or ADJUST with the head trained so far), stop it after a random number of steps,
and continue from there with K=1. The first `start` positions of the order are the policy's (several per
step, so they are not a K=1 path); states j >= start are exactly the states the K>1 sampler reaches, followed
by the base's own K=1 continuation, which gives the true next tokens. This is the DAgger fix for exposure
bias: the head is trained where it will be used.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..models.mdlm import read_config
from ..models.protocol import DiffusionLM
from ..outputs import check_output_dir, new_file_mode
from ..sampling.base import TokenChoice
from ..sampling.loop import SamplingConfig, encode_prompts, generate, sample_seed
from ..sampling.registry import make_sampler
from ..validation import require_positive

if TYPE_CHECKING:
    from .head import AdjustHead

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard-(\d{5})\.safetensors$")
TENSOR_KEYS = ("prefix", "prefix_len", "tokens", "order", "index")
POLICY_SEED_OFFSET = 1_000_003
_RESUME_IGNORED = ("progress", "batch_size")
"""Settings that do not change the data (every trajectory is seeded by its own index)."""


@dataclass(frozen=True)
class TrajectoryConfig:
    """What to collect; every field but `progress` is part of the data's identity."""

    num: int = 4000
    length: int = 32
    temperature: float = 1.0
    rule: str = "confidence"
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    shard_size: int = 256
    batch_size: int = 256
    progress: bool = True
    policy_tokens_per_step: tuple[int, ...] = (1,)
    """K of the sampler that reaches each trajectory's first K=1 state; (1,) = plain K=1 trajectories. Several
    values: trajectory j uses the one picked by its seed."""
    policy_head: str | None = None
    """Fingerprint of the ADJUST head that drives the K>1 policy; None = naive parallel."""
    policy_threshold: float | None = None
    """With a policy head: half of the policy trajectories (picked by their seeds) use `adjust:threshold=` this,
    so that the states where that sampler starts its steps are trained on."""
    chat: bool = False
    """Prompts as user turns in the model's chat template (an instruct head); see `encode_prompts`."""

    def __post_init__(self) -> None:
        require_positive(self, ("num", "length", "shard_size", "batch_size"))
        object.__setattr__(self, "policy_tokens_per_step", tuple(int(k) for k in self.policy_tokens_per_step))
        if not self.policy_tokens_per_step or min(self.policy_tokens_per_step) < 1:
            raise ValueError(f"policy_tokens_per_step must be positive integers, got {self.policy_tokens_per_step}")
        if self.on_policy and self.length < 3:
            raise ValueError("on-policy collection needs a canvas of at least 3 tokens")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.policy_threshold is not None and not 0 < self.policy_threshold <= 1:
            raise ValueError(f"policy_threshold must be in (0, 1], got {self.policy_threshold}")
        self.choice()

    def choice(self) -> TokenChoice:
        """The base model's own token choice (validates rule, temperature, top_k, top_p)."""
        return TokenChoice(rule=self.rule, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(length=self.length, tokens_per_step=1, choice=self.choice(), seed=self.seed,
                              batch_size=self.batch_size, record_history=True, progress=False, chat=self.chat,
                              stop_at_text_end=False)

    @property
    def on_policy(self) -> bool:
        return max(self.policy_tokens_per_step) > 1

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num))


def shard_path(out_dir: str | Path, shard: int) -> Path:
    return Path(out_dir) / f"shard-{shard:05d}.safetensors"


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed if initialised, else env RANK/WORLD_SIZE, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through a uniquely named temp file in the same directory, so readers and concurrent writers
    only ever see a complete file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, new_file_mode())
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, sort_keys=True)))


def _manifest(cfg: TrajectoryConfig, model: DiffusionLM, prompts: list[str] | None) -> dict:
    return {"format": FORMAT_VERSION, "kind": "jointdlm-trajectories", "sampler": "sequential",
            "config": asdict(cfg), "fingerprint": model.fingerprint(), "prompts": prompts,
            "num_shards": cfg.num_shards, "pad_id": model.spec.pad_id, "mask_id": model.spec.mask_id}


def _read_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no trajectory collection (no {MANIFEST_FILE}); "
                                "collect one with `jointdlm trajectories`")
    manifest = read_config(path)  # errors name the file: not JSON, not UTF-8, not an object
    missing = [key for key in ("config", "fingerprint", "pad_id") if key not in manifest]
    if missing or not isinstance(manifest["config"], dict):
        raise ValueError(f"{path} is not a trajectory manifest (no {(missing or ['config'])[0]}); collect the "
                         "trajectories again with `jointdlm trajectories`")
    return manifest


def _check_resumable(out_dir: Path, existing: dict, wanted: dict) -> None:
    """Refuse to mix data from different settings or base models in one directory."""
    problems = []
    if existing.get("fingerprint") != wanted["fingerprint"]:
        problems.append(f"base model fingerprint {existing.get('fingerprint')} there, "
                        f"{wanted['fingerprint']} for the model given")
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(TrajectoryConfig)
                                      if not isinstance(f.default, type(MISSING))}))
    old_cfg, new_cfg = existing.get("config") or {}, json.loads(json.dumps(wanted["config"]))
    for key in new_cfg:
        old = old_cfg.get(key, defaults.get(key))
        if key not in _RESUME_IGNORED and old != new_cfg[key]:
            problems.append(f"{key}={old!r} there, {new_cfg[key]!r} asked for")
    if existing.get("prompts") != wanted["prompts"]:
        problems.append("the prompts differ")
    if existing.get("format") != wanted["format"]:
        problems.append(f"format version {existing.get('format')} there, {wanted['format']} expected")
    if problems:
        raise ValueError(f"{out_dir} already holds trajectories collected differently "
                         f"({'; '.join(problems)}); use another directory, or delete this one to start over")


def _read_shard(path: Path, expected: range, length: int) -> dict[str, torch.Tensor]:
    """A shard's tensors, checked against the indices and length it must hold (ValueError otherwise)."""
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"shard {path} cannot be read ({err}); delete it and run `jointdlm trajectories` with "
                         "the same arguments to collect it again") from None
    missing = [k for k in TENSOR_KEYS if k not in data]
    if missing:
        raise ValueError(f"shard {path.name} lacks tensors {missing}")
    n = len(expected)
    if not torch.equal(data["index"], torch.arange(expected.start, expected.stop)):
        raise ValueError(f"shard {path.name} does not hold trajectories "
                         f"{expected.start}..{expected.stop - 1}")
    shapes = {"prefix_len": (n,), "tokens": (n, length), "order": (n, length), "start": (n,)}
    data.setdefault("start", torch.zeros(n, dtype=torch.long))
    for key, shape in shapes.items():
        if tuple(data[key].shape) != shape:
            raise ValueError(f"shard {path.name}: {key} has shape {tuple(data[key].shape)}, expected {shape}")
    if data["prefix"].dim() != 2 or data["prefix"].shape[0] != n:
        raise ValueError(f"shard {path.name}: prefix has shape {tuple(data['prefix'].shape)}")
    _check_orders(data["order"], path.name)
    return data


def _check_orders(order: torch.Tensor, where: str) -> None:
    length = order.shape[1]
    expected = torch.arange(length).expand_as(order)
    bad = (order.sort(dim=1).values != expected).any(dim=1).nonzero().squeeze(-1)
    if bad.numel():
        raise ValueError(f"{where}: order row(s) {bad[:5].tolist()} are not permutations of 0..{length - 1}")


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
    return out, torch.tensor([len(r) for r in rows], dtype=torch.long)


def _remove_stale_temps(out_dir: Path, shards: list[int]) -> None:
    """Temp files a killed run of this rank left behind (only this rank ever writes these shards)."""
    for s in shards:
        for tmp in out_dir.glob(f".{shard_path(out_dir, s).name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _collect_batch(model: DiffusionLM, cfg: TrajectoryConfig, indices: range, prompts: list[str] | None,
                   head: AdjustHead | None) -> dict[str, torch.Tensor]:
    """Tokens, order and start of trajectories `indices` (K=1 from the start, or from an on-policy state)."""
    n, length = len(indices), cfg.length
    sequential = make_sampler("sequential")
    if not cfg.on_policy:
        gen = generate(model, sequential, cfg.sampling(), prompts=prompts, num=None if prompts else n,
                       index_offset=indices.start)
        return {"tokens": torch.tensor(gen.tokens, dtype=torch.long).reshape(n, length),
                "order": torch.tensor(gen.history, dtype=torch.long).reshape(n, length),
                "start": torch.zeros(n, dtype=torch.long)}
    # Each trajectory's policy K and cut step come from its own seed, so any slice regenerates alike.
    draws = [torch.Generator().manual_seed(sample_seed(cfg.seed + POLICY_SEED_OFFSET, j)) for j in indices]
    ks = torch.tensor([cfg.policy_tokens_per_step[int(torch.randint(len(cfg.policy_tokens_per_step), (1,),
                                                                    generator=g))] for g in draws])
    opened = torch.zeros(n, dtype=torch.bool)
    if head is not None and cfg.policy_threshold is not None:
        opened = torch.tensor([bool(torch.rand((), generator=g) < 0.5) for g in draws])
    mask_id = model.spec.mask_id
    init = torch.full((n, length), mask_id, dtype=torch.long)
    policy_order = torch.full((n, length), -1, dtype=torch.long)
    for k, opens in sorted({(int(k), bool(o)) for k, o in zip(ks, opened, strict=True)}):
        rows = ((ks == k) & (opened == opens)).nonzero().squeeze(-1)
        if head is None or k == 1:
            sampler = make_sampler("parallel")
        else:
            sampler = make_sampler("adjust", head=head, threshold=cfg.policy_threshold if opens else None)
        config = SamplingConfig(length=length, tokens_per_step=k, choice=cfg.choice(),
                                seed=cfg.seed + POLICY_SEED_OFFSET, batch_size=cfg.batch_size, record_history=True,
                                progress=False, chat=cfg.chat, stop_at_text_end=False)
        gen = generate(model, sampler, config, prompts=None if prompts is None else [prompts[i] for i in rows],
                       num=None if prompts else len(rows), sample_indices=[indices[i] for i in rows.tolist()])
        history = torch.tensor(gen.history, dtype=torch.long).reshape(len(rows), length)
        tokens = torch.tensor(gen.tokens, dtype=torch.long).reshape(len(rows), length)
        for row, h, t in zip(rows.tolist(), history, tokens, strict=True):
            # Cut after 1..steps-1 policy steps: at least one policy step, and masks left to continue from.
            steps = int(h.max()) + 1
            cut = int(torch.randint(1, max(2, steps), (1,), generator=draws[row]))
            keep = h < cut
            init[row] = torch.where(keep, t, torch.full_like(t, mask_id))
            policy_order[row] = torch.where(keep, h, torch.full_like(h, -1))
    gen = generate(model, sequential, cfg.sampling(), prompts=prompts, num=None if prompts else n,
                   index_offset=indices.start, init=init)
    tokens = torch.tensor(gen.tokens, dtype=torch.long).reshape(n, length)
    continuation = torch.tensor(gen.history, dtype=torch.long).reshape(n, length)
    kept = policy_order >= 0
    start = kept.sum(-1)
    # The policy's positions come first, by step then position; the K=1 continuation follows in its own order.
    key = torch.where(kept, policy_order * length + torch.arange(length), torch.full_like(policy_order, -1))
    ranks = key.masked_fill(~kept, 2**62).argsort(dim=-1, stable=True).argsort(dim=-1)
    continuation_rank = continuation - continuation.masked_fill(kept, 2**62).min(-1, keepdim=True).values
    order = torch.where(kept, ranks, start[:, None] + continuation_rank)
    return {"tokens": tokens, "order": order, "start": start}


def collect_trajectories(model: DiffusionLM, out_dir: str | Path, cfg: TrajectoryConfig,
                         prompts: list[str] | None = None, rank: int = 0, world_size: int = 1,
                         head: AdjustHead | None = None) -> dict:
    """Collect (or resume collecting) this rank's shards of trajectories into `out_dir`.

    Shard s holds trajectories [s * shard_size, (s + 1) * shard_size) and belongs to rank s % world_size;
    complete shards already on disk are skipped. `head` drives the K>1 policy of an on-policy collection
    (its fingerprint must be `cfg.policy_head`). Returns {"generated", "skipped", "samples_per_s", ...}.
    """
    if (head.fingerprint() if head is not None else None) != cfg.policy_head:
        raise ValueError("the head given does not match cfg.policy_head (pass the head whose fingerprint it names)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if prompts is not None:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass None for unconditional trajectories")
    out_dir = check_output_dir(out_dir)
    spec = model.spec
    if prompts is None and cfg.chat:
        raise ValueError("chat=True (--chat) templates prompts; give prompts")
    prefixes = encode_prompts(model, prompts if prompts is not None else [""], cfg.chat)
    longest = max(len(p) for p in prefixes)
    if longest + cfg.length > model.max_length:
        raise ValueError(f"a prefix of {longest} tokens + length={cfg.length} exceeds the model's maximum of "
                         f"{model.max_length} tokens")

    wanted = _manifest(cfg, model, prompts)
    manifest_path = out_dir / MANIFEST_FILE
    # Strays are checked before the manifest: every writer creates the manifest before its first shard.
    strays = sorted(p.name for p in out_dir.glob("shard-*.safetensors") if SHARD_PATTERN.match(p.name))
    if manifest_path.exists():
        _check_resumable(out_dir, _read_manifest(out_dir), wanted)
    else:
        if strays:
            raise ValueError(f"{out_dir} holds shard files ({strays[0]}, ...) but no {MANIFEST_FILE}, so "
                             "their settings are unknown; use another directory")
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(manifest_path, wanted)

    mine = [s for s in range(cfg.num_shards) if s % world_size == rank]
    _remove_stale_temps(out_dir, mine)
    todo, skipped = [], 0
    for s in mine:
        path = shard_path(out_dir, s)
        if path.exists():
            try:
                _read_shard(path, cfg.shard_range(s), cfg.length)
                skipped += len(cfg.shard_range(s))
                continue
            except ValueError:
                pass
        todo.append(s)

    total = sum(len(cfg.shard_range(s)) for s in mine)
    bar = tqdm(total=total, initial=skipped, disable=not cfg.progress, desc=f"trajectories (rank {rank})",
               dynamic_ncols=True)
    generated, start = 0, time.perf_counter()
    with bar:  # closed (its line ended) even when a batch fails, so an error starts on its own line
        for s in todo:
            indices = cfg.shard_range(s)
            parts = []
            for first in range(indices.start, indices.stop, cfg.batch_size):
                batch = range(first, min(first + cfg.batch_size, indices.stop))
                batch_prompts = None if prompts is None else [prompts[j % len(prompts)] for j in batch]
                parts.append(_collect_batch(model, cfg, batch, batch_prompts, head))
                bar.update(len(batch))
            rows = [prefixes[j % len(prefixes)] for j in indices]
            prefix, prefix_len = _left_pad(rows, spec.pad_id)
            tensors = {"prefix": prefix, "prefix_len": prefix_len,
                       **{key: torch.cat([p[key] for p in parts]) for key in ("tokens", "order", "start")},
                       "index": torch.arange(indices.start, indices.stop, dtype=torch.long)}
            _check_orders(tensors["order"], f"shard {s}")
            meta = {"fingerprint": wanted["fingerprint"], "shard": str(s)}
            _atomic_write(shard_path(out_dir, s), lambda tmp, t=tensors, m=meta: save_file(t, tmp, metadata=m))
            generated += len(indices)
    elapsed = time.perf_counter() - start
    return {"generated": generated, "skipped": skipped,
            "samples_per_s": round(generated / elapsed, 2) if generated and elapsed > 0 else 0.0,
            "shards_written": len(todo), "shards_owned": len(mine), "out_dir": str(out_dir)}


@dataclass
class Trajectories:
    """All trajectories of one collection, sorted by index, prefixes left-padded to a common width."""

    prefix: torch.Tensor
    prefix_len: torch.Tensor
    tokens: torch.Tensor
    order: torch.Tensor
    config: TrajectoryConfig
    fingerprint: str
    start: torch.Tensor | None = None
    """(N,) first state of each trajectory that is followed by K=1 steps (0 for plain K=1 trajectories)."""

    def __post_init__(self) -> None:
        if self.start is None:
            self.start = torch.zeros(len(self.tokens), dtype=torch.long)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def state(self, i: int, j: int, mask_id: int) -> torch.Tensor:
        """Generated region (L,) of trajectory i after j unmaskings: final tokens where order < j, else mask."""
        if not 0 <= j <= self.length:
            raise ValueError(f"j must be in [0, {self.length}], got {j}")
        return torch.where(self.order[i] < j, self.tokens[i], torch.full_like(self.tokens[i], mask_id))

    def states(self, rows: torch.Tensor, steps: torch.Tensor, mask_id: int) -> torch.Tensor:
        """Batched `state`: (B, L) generated regions of trajectories `rows` after `steps[b]` unmaskings."""
        tokens, order = self.tokens[rows], self.order[rows]
        return torch.where(order < steps[:, None], tokens, torch.full_like(tokens, mask_id))

    def _subset(self, rows: slice) -> Trajectories:
        prefix_len = self.prefix_len[rows]
        width = int(prefix_len.max()) if prefix_len.numel() else 0
        return Trajectories(prefix=self.prefix[rows, self.prefix.shape[1] - width:], prefix_len=prefix_len,
                            tokens=self.tokens[rows], order=self.order[rows], config=self.config,
                            fingerprint=self.fingerprint, start=self.start[rows])

    def split(self, heldout: int) -> tuple[Trajectories, Trajectories]:
        """(train, held-out): the last `heldout` trajectories are held out, so the split never changes."""
        if not 0 <= heldout < len(self):
            raise ValueError(f"heldout must be in [0, {len(self)}), got {heldout}")
        cut = len(self) - heldout
        return self._subset(slice(0, cut)), self._subset(slice(cut, len(self)))


def load_trajectories(out_dir: str | Path) -> Trajectories:
    """Every shard of a finished collection, merged and sorted by index; errors name missing or bad shards."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    names = {f.name for f in fields(TrajectoryConfig)}
    try:
        cfg = TrajectoryConfig(**{k: v for k, v in manifest["config"].items() if k in names})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{out_dir / MANIFEST_FILE} holds a bad setting: {err}") from None
    if manifest.get("num_shards") != cfg.num_shards:
        raise ValueError(f"{out_dir}/{MANIFEST_FILE} says {manifest.get('num_shards')} shards, its config "
                         f"implies {cfg.num_shards}")
    missing = [s for s in range(cfg.num_shards) if not shard_path(out_dir, s).is_file()]
    if missing:
        listed = ", ".join(shard_path(out_dir, s).name for s in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise FileNotFoundError(f"trajectory collection in {out_dir} is incomplete: {len(missing)} of "
                                f"{cfg.num_shards} shards missing ({listed}{more}); re-run "
                                "collect_trajectories with the same arguments to finish it")
    parts = [_read_shard(shard_path(out_dir, s), cfg.shard_range(s), cfg.length)
             for s in range(cfg.num_shards)]
    width = max(p["prefix"].shape[1] for p in parts)
    prefix = torch.cat([_pad_left_to(p["prefix"], width, int(manifest["pad_id"])) for p in parts])
    merged = {key: torch.cat([p[key] for p in parts]) for key in ("prefix_len", "tokens", "order", "index", "start")}
    if not torch.equal(merged["index"], torch.arange(cfg.num)):
        raise ValueError(f"{out_dir}: shard indices do not cover 0..{cfg.num - 1} exactly once")
    return Trajectories(prefix=prefix, prefix_len=merged["prefix_len"], tokens=merged["tokens"],
                        order=merged["order"], config=cfg, fingerprint=manifest["fingerprint"], start=merged["start"])


def _pad_left_to(prefix: torch.Tensor, width: int, pad_id: int) -> torch.Tensor:
    pad = torch.full((prefix.shape[0], width - prefix.shape[1]), pad_id, dtype=prefix.dtype)
    return torch.cat([pad, prefix], dim=1)

