"""How many samples write a PAD before their EOS (a base learns PAD only after a document's end; the text ends at
the first of either since 2026-12-07, where decoding had glued the words after such a PAD on), how many write words
after that end (a word among the tail's PADs: the text before it then tends to run up to it), and the text's mean
length in tokens. First it prints the base's PAD probability at each position of the all-masked canvas: a round
that writes every position of at least a threshold's confidence writes the tail from these marginals at once.

    python benchmarks/pad_before_eos.py --model runs/demo/english/model --adjust runs/demo/english/adjust
"""

from __future__ import annotations

import argparse

import torch
from sampler_time import load_runs, require_positive

from jointdlm.models.protocol import DiffusionLM
from jointdlm.sampling.loop import SamplingConfig, build_canvas, encode_prompts, generate, stop_ids
from jointdlm.sampling.registry import make_from_spec

SAMPLERS = ("sequential:1,parallel:4,parallel:48,adjust:48,adjust:threshold=0.9:48,threshold:tau=0.5:1,"
            "threshold:tau=0.9:1")


def pad_before_eos(tokens: list[list[int]], pad_id: int, eos_id: int) -> int:
    """Rows with a PAD before their first EOS (or anywhere, in a row with no EOS)."""
    return sum(pad_id in row[: row.index(eos_id) if eos_id in row else len(row)] for row in tokens)


def words_after_end(tokens: list[list[int]], stops: set[int] | tuple[int, ...]) -> tuple[int, float]:
    """Rows with a token other than a stop (`loop.stop_ids`: EOS, PAD) after their first stop, and the mean index of
    that first one (the row's length where it has none): the text's length in canvas tokens."""
    rows, total = 0, 0
    for row in tokens:
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows += any(t not in stops for t in row[end:])
        total += end
    return rows, total / max(1, len(tokens))


def first_pass_pad(model: DiffusionLM, length: int) -> list[float]:
    """The base's PAD probability at each generated position of the all-masked (unprompted) canvas."""
    tokens, attention, start = build_canvas(model, encode_prompts(model, [""]), length)
    with torch.no_grad():
        logits = model.forward(tokens, attention).logits
    return logits[0, start:].float().softmax(-1)[:, model.spec.pad_id].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adjust")
    parser.add_argument("--samplers", default=SAMPLERS, help="comma-separated SPEC:K")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_positive(parser, args, ("num", "threads"))
    torch.set_num_threads(args.threads)
    try:  # every spec built before anything samples: a bad one is one line
        model, head, items = load_runs(args.model, args.adjust, args.samplers)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    pad = first_pass_pad(model, model.max_length - 1)
    print("PAD probability from the all-masked canvas, by position (1 = the first generated): "
          + " ".join(f"{i + 1}:{p:.2f}" for i, p in enumerate(pad)), flush=True)
    for item, spec, k in items:
        config = SamplingConfig(length=model.max_length - 1, tokens_per_step=k, seed=args.seed, batch_size=250)
        with torch.no_grad():
            tokens = generate(model, make_from_spec(spec, head=head), config, num=args.num).tokens
        stray, length = words_after_end(tokens, stop_ids(model))
        print(f"{item}: {pad_before_eos(tokens, model.spec.pad_id, model.spec.eos_id)} of {args.num} samples write "
              f"a PAD before their EOS, {stray} a word after their end; {length:.1f} tokens a text", flush=True)


if __name__ == "__main__":
    main()
