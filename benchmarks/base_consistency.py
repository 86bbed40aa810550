"""How far a base's other marginals move when it writes the token it is surest of.

If the base's marginals came from one joint distribution, writing a token of probability p would move every other
position's marginal by at most 1 - p in total variation. Along K=1 trajectories (confidence rule, `--num` samples,
`--max-written` steps deep), this writes the most confident position's most likely token, runs the base again and
prints 1 - p against the largest and mean total-variation change at the other masked positions.

    python benchmarks/base_consistency.py --model runs/demo/template/model --length 23
"""

from __future__ import annotations

import argparse

import torch

from jointdlm.models.loading import load_model
from jointdlm.sampling.loop import build_canvas, encode_prompts


def marginals(model, tokens: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model.forward(tokens, attention, None).logits.float()
    logits[..., model.spec.never_sampled()] = -torch.inf
    return logits.softmax(-1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--num", type=int, default=1, help="K=1 trajectories to probe along")
    parser.add_argument("--max-written", type=int, default=12, help="probe after 0..N-1 tokens of each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        model = load_model(args.model)
        canvas, attention, _ = build_canvas(model, encode_prompts(model, [""]), args.length)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    mask_id = model.spec.mask_id
    gen = torch.Generator().manual_seed(args.seed)
    print("written  1-p        max TV   mean TV")
    for _ in range(args.num):
        tokens = canvas.clone()
        for written in range(min(args.max_written, args.length - 1)):
            p = marginals(model, tokens, attention)
            masked = tokens[0] == mask_id
            confidence = p.max(-1).values.masked_fill(~masked, -1.0)
            pos = int(confidence.argmax())
            probe = tokens.clone()
            probe[0, pos] = int(p[pos].argmax())
            others = masked.clone()
            others[pos] = False
            tv = 0.5 * (marginals(model, probe, attention)[others] - p[others]).abs().sum(-1)
            print(f"{written:7d}  {1 - float(confidence[pos]):.2e}  {float(tv.max()):.4f}   {float(tv.mean()):.4f}")
            tokens[0, pos] = int(torch.multinomial(p[pos], 1, generator=gen))  # the K=1 step


if __name__ == "__main__":
    main()
