"""Time per sequence of K=1, naive parallel and ADJUST, measured side by side in one process.

    python benchmarks/speed.py --preset large --length 128 --batch-size 8 [--json OUT] [--device cuda]
    python benchmarks/speed.py [--model DIR --adjust DIR] [--num N] [--batch-size B] [--repeats R]
    python benchmarks/speed.py --preset large --length 128 --batch-size 8 --compare-full-head --compare-anywhere
    python benchmarks/speed.py --preset dream-7b --length 128 --batch-size 8 --device cuda --dtype bfloat16

With --preset: a random-weight built-in base of that preset (timing needs no training; vocabulary 4096, a BPE
trained on the English corpus; `dream-7b` is Dream-7B's shape, d=3584, 28 heads, MLP 18944, 28 layers,
vocabulary 152,064, with `--layers N` to keep fewer) and an untrained head whose output gain is set non-zero, so its
pass changes the logits as a trained head's does. Without: the template-language model and head that `make demo` builds.
Prints, per sampler and K: base passes, head passes, ms per sequence (best of R), ratios to K=1 and to naive
parallel at the same K, the pass-time floor of ADJUST against naive (the row's time inside base and head passes
over its time inside base passes: what ADJUST would cost against naive if nothing outside the passes took time)
and the share of the row's time spent outside model and head passes. The rows are timed in rounds (each row once
a round, best of R rounds) with nothing around the passes; the time inside passes is clocked around every call in
one more run of each row (on a GPU the clocks synchronise at every call, which would hold back the queueing of
the next pass in a timed run), so a head pass that computes a few candidate positions is counted at what it
costs. The header line also gives one base pass and one head pass over every masked position of a
half-written canvas, for scale. With --compare-full-head, the same head's weights
are also timed updating every position (`masked_only=False`, what heads saved before the masked-position pass
do), as rows `adjust-every-position`; with --compare-anywhere, the same head choosing among every masked position
(`adjust:candidates=LENGTH`, the published sampler's choice) instead of the base's 8 best, as rows `adjust-anywhere`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from jointdlm.adjust.head import AdjustHead, AdjustHeadConfig
from jointdlm.data.corpora import build_corpus
from jointdlm.models.loading import load_model, resolve_device
from jointdlm.models.mdlm import PRESETS, BuiltinModel, MaskedDiffusionTransformer, MDLMConfig
from jointdlm.models.tokenizer import BPETokenizer
from jointdlm.sampling.loop import Generation, SamplingConfig, build_canvas, encode_prompts, generate
from jointdlm.sampling.registry import make_sampler

SHAPES: dict[str, dict[str, int]] = {
    **{name: {**shape, "vocab_size": 4096} for name, shape in PRESETS.items()},
    # Dream-7B's width, MLP, depth and vocabulary (its attention has 4 key-value heads; ours has 28, which adds
    # about 9% to a layer's multiply-adds: 255M parameters against 233M).
    "dream-7b": {"d_model": 3584, "n_heads": 28, "mlp_hidden": 18944, "n_layers": 28, "vocab_size": 152064},
}


class IdsOnlyTokenizer:
    """A tokenizer of a given vocabulary size for timing runs, whose text nobody reads: ids decode to numbers."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        if text:
            raise ValueError("this timing tokenizer encodes no text")
        return []

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def random_base(preset: str, length: int, device: str, vocab_size: int | None = None, seed: int = 0,
                layers: int | None = None, dtype: torch.dtype = torch.float32) -> BuiltinModel:
    """A built-in base of the shape's size (or vocabulary `vocab_size`) with random weights (timing does not
    depend on training)."""
    shape = dict(SHAPES[preset])
    shape_vocab = shape.pop("vocab_size")
    vocab_size = vocab_size or shape_vocab
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be positive, got {layers}")
        shape["n_layers"] = layers
    tokenizer = (BPETokenizer.train(build_corpus("english", None, seed=0), vocab_size) if vocab_size <= 4096
                 else IdsOnlyTokenizer(vocab_size))
    torch.manual_seed(seed)
    with torch.device(device):  # built where it runs: a 7B-shaped base is 28 GB in float32
        net = MaskedDiffusionTransformer(MDLMConfig(vocab_size=tokenizer.vocab_size, max_length=length + 1, **shape))
    base = BuiltinModel(net.eval().requires_grad_(False).to(dtype), tokenizer)
    base._fingerprint = f"random-{preset}-{seed}"  # no head is saved for it; hashing 7B weights took a minute
    return base


def device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def live_head(base: BuiltinModel, seed: int = 0) -> AdjustHead:
    """An untrained head whose update is not zero, so a head pass does everything a trained one does."""
    torch.manual_seed(seed)
    head = AdjustHead(AdjustHeadConfig.for_base(base))
    with torch.no_grad():
        head.out_norm.weight.fill_(0.1)
    network = base.net if hasattr(base, "net") else base.model  # built-in, or a Hugging Face adapter
    dtype = next(network.parameters()).dtype
    return head.eval().requires_grad_(False).to(base.device, dtype)


class PassClock:
    """Wraps a base model or a head and adds up the wall time spent inside its calls (synchronising a GPU)."""

    def __init__(self, inner, device: torch.device) -> None:
        self.inner, self.seconds = inner, 0.0
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _timed(self, fn, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out

    def forward(self, *args, **kwargs):
        return self._timed(self.inner.forward, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._timed(self.inner, *args, **kwargs)

    def step_passes(self, *args, **kwargs):
        """A head's passes within a sampling step (`AdjustHead.step_passes`), each pass clocked."""
        passes = self.inner.step_passes(*args, **kwargs)
        logits = passes.logits
        passes.logits = lambda *a, **k: self._timed(logits, *a, **k)
        return passes


def timed_run(model, sampler, config: SamplingConfig, num: int, init: torch.Tensor | None = None
              ) -> tuple[float, Generation]:
    """Wall time of one run of `generate` (with `init`: a pre-filled canvas) and its result."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(model, sampler, config, num=num, init=init)
    sync()
    return time.perf_counter() - start, out


def best_of(model, sampler, config: SamplingConfig, num: int, repeats: int, init: torch.Tensor | None = None
            ) -> tuple[float, Generation]:
    """The fastest wall time of `repeats` identical runs of `generate` and the last run's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        seconds, out = timed_run(model, sampler, config, num, init)
        best = min(best, seconds)
    return best, out


def inside_passes(model, sampler, config: SamplingConfig, num: int, clocks: Sequence[PassClock]
                  ) -> tuple[float, list[float]]:
    """One more run with `clocks` around the model and heads (which `model` and `sampler` must use): its wall time
    and the seconds spent inside each clock's calls. Apart from the timed runs, whose GPU work the clocks'
    synchronisations would serialise."""
    for clock in clocks:
        clock.seconds = 0.0
    seconds, _ = timed_run(model, sampler, config, num)
    return seconds, [clock.seconds for clock in clocks]


def every_position(head: AdjustHead) -> AdjustHead:
    """The same weights, updating every position of the canvas (as heads saved before the masked-position pass)."""
    full = AdjustHead(replace(head.config, masked_only=False))
    full.load_state_dict(head.state_dict())
    return full.eval().requires_grad_(False).to(next(head.parameters()).device)


def pass_times(base: BuiltinModel, heads: Sequence[AdjustHead], batch: int, length: int,
               repeats: int = 7) -> tuple[float, list[float]]:
    """Median seconds of one base pass and of one pass of each head over a (batch, length) canvas as a sampler
    meets it on average: half the positions written (a seeded random half), logits asked for at the masked half."""
    tokens, attention, _ = build_canvas(base, encode_prompts(base, [""] * batch), length)
    generator = torch.Generator().manual_seed(0)
    canvas = (tokens == base.spec.mask_id).cpu()
    written = canvas & (torch.rand(tokens.shape, generator=generator) < 0.5)
    ids = torch.randint(base.spec.vocab_size, tokens.shape, generator=generator)
    ids = torch.where(ids == base.spec.mask_id, (ids + 1) % base.spec.vocab_size, ids)
    tokens = torch.where(written.to(tokens.device), ids.to(tokens.device), tokens)
    at = tokens == base.spec.mask_id
    sync = torch.cuda.synchronize if base.device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.no_grad():
        hidden = base.forward(tokens, attention).hidden
        return (timed(lambda: base.forward(tokens, attention, at=at)),
                [timed(lambda head=head: head(base, tokens, attention, hidden, at=at)) for head in heads])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(SHAPES), default=None, help="random-weight base of this shape")
    parser.add_argument("--layers", type=int, default=None, help="with --preset: this many layers instead")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="with --preset: the base's and head's weights")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default: the canvas)")
    parser.add_argument("--model", default="runs/demo/template/model")
    parser.add_argument("--adjust", default="runs/demo/template/adjust")
    parser.add_argument("--num", type=int, default=None, help="sequences per row (default: one batch)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens-per-step", default="2,4,8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--compare-full-head", action="store_true",
                        help="also time ADJUST with the same head updating every position (rows adjust-every-position)")
    parser.add_argument("--compare-anywhere", action="store_true",
                        help="also time ADJUST letting the head choose among every masked position, not among the "
                             "base's 8 best candidates (rows adjust-anywhere)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        if args.preset:
            length = args.length or 128
            model = random_base(args.preset, length, str(device), layers=args.layers,
                                dtype=getattr(torch, args.dtype))
            head = live_head(model)
        else:
            model = load_model(args.model, str(device))
            head = AdjustHead.from_pretrained(args.adjust, model).to(device)
            length = args.length or model.max_length - 1
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"speed: error: {err} (run `make demo` first, or pass --preset, or --model and --adjust)",
              file=sys.stderr)
        return 2
    num = args.num or args.batch_size
    batch = min(args.batch_size, num)
    heads = {"adjust": head}
    if args.compare_full_head:
        heads["adjust-every-position"] = every_position(head)
    if args.compare_anywhere:
        heads["adjust-anywhere"] = head
    options = {"adjust-anywhere": {"candidates": length}}
    runs = [("sequential", 1)] + [(name, int(k)) for k in args.tokens_per_step.split(",")
                                   for name in ("parallel", *heads)]
    layers = model.net.config.n_layers
    source = (f"random-weight {args.preset} ({layers} layers, d={model.hidden_size}, vocabulary "
              f"{model.spec.vocab_size}, {args.dtype})" if args.preset else args.model)
    print(f"# {source}, {device_name(device)}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; "
          f"{num} sequences x {length} tokens, batch {batch}, best of {args.repeats}")
    timed_heads = {name: h for name, h in heads.items() if name not in options}  # the same head: timed once
    base_s, times = pass_times(model, list(timed_heads.values()), batch, length)
    head_times = dict(zip(timed_heads, times, strict=True))
    head_s = head_times["adjust"]
    print(f"# one pass over the batch: base {1000 * base_s:.2f} ms; " + ", ".join(
        f"head {name} {1000 * t:.2f} ms ({t / base_s:.3f} of a base pass)" for name, t in head_times.items()))
    def sampler_of(name: str, head_of: dict):
        return make_sampler("adjust", head=head_of[name], **options.get(name, {})) if name in head_of \
            else make_sampler(name)

    configs = {(name, k): SamplingConfig(length=length, tokens_per_step=k, batch_size=batch) for name, k in runs}
    samplers = {(name, k): sampler_of(name, heads) for name, k in runs}
    # Rows timed in rounds (every row once a round, best of the rounds), so a slow spell of the machine falls on
    # all of them alike; no clock inside the timed runs.
    best = dict.fromkeys(runs, float("inf"))
    counters = {}
    for _ in range(args.repeats):
        for row in runs:
            seconds, out = timed_run(model, samplers[row], configs[row], num)
            best[row], counters[row] = min(best[row], seconds), out.counters
    # Then one clocked run a row: the share of its time inside base and head passes.
    clocked_model = PassClock(model, model.device)
    clocked_heads = {name: PassClock(h, model.device) for name, h in heads.items()}
    inside = {row: inside_passes(clocked_model, sampler_of(row[0], clocked_heads), configs[row], num,
                                 (clocked_model, *clocked_heads.values())) for row in runs}
    k1 = best[("sequential", 1)]
    rows = []
    print("| sampler | K | base passes | head passes | ms/seq | time vs K=1 | time vs naive same K "
          "| floor vs naive | outside passes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, k), seconds in best.items():
        c = counters[(name, k)]
        naive = best.get(("parallel", k))  # none for K=1's row: no naive row to compare it with
        clocked_seconds, (base_inside, *heads_inside) = inside[(name, k)]
        floor = (base_inside + sum(heads_inside)) / base_inside
        overhead = 1 - (base_inside + sum(heads_inside)) / clocked_seconds
        rows.append({"sampler": name, "k": k, "ms_per_seq": 1000 * seconds / num, "base_passes": c.base_passes,
                     "head_passes": c.extra_passes, "floor_vs_naive": floor, "overhead_share": overhead,
                     "time_vs_k1": seconds / k1, "time_vs_naive": None if naive is None else seconds / naive})
        versus = "–" if naive is None else f"{seconds / naive:.2f}x"
        print(f"| {name} | {k} | {c.base_passes:.1f} | {c.extra_passes:.1f} | {1000 * seconds / num:.3f} "
              f"| {seconds / k1:.2f}x | {versus} | {floor:.2f}x | {overhead:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "device": device_name(device),
                       "threads": torch.get_num_threads(), "base_pass_ms": 1000 * base_s,
                       "head_pass_ms": 1000 * head_s,
                       "head_pass_ms_by_sampler": {n: 1000 * t for n, t in head_times.items()}, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
