"""Plots of an evaluation run: quality vs tokens per step, quality vs speed, and unmasking order."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"validity": "validity (share of valid strings)", "accuracy": "task accuracy (exact match)",
          "mauve": "MAUVE vs K=1 samples", "nll": "NLL under the scorer (nats/token, lower is better)",
          "mauve_base": "MAUVE vs K=1 samples (base model's own features)"}


def _metric(rows: list[dict]) -> str | None:
    for name in ("validity", "accuracy", "mauve", "nll", "mauve_base"):
        if any(name in r["quality"] for r in rows):
            return name
    return None


def plot_quality(results: dict, path: Path) -> None:
    rows = results["rows"]
    metric = _metric(rows)
    if metric is None:
        return
    k1 = next((r for r in rows if r["sampler"] == "sequential"), None)
    fig, (ax_k, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    samplers = sorted({r["sampler"] for r in rows if r["sampler"] != "sequential"})
    for name in samplers:
        pts = [r for r in rows if r["sampler"] == name]
        if k1 is not None and pts[0]["tokens_per_step"] is not None:
            pts = [k1] + pts
        xs_k = [r["tokens_per_step"] or r["speed"]["tokens_per_base_pass"] for r in pts]
        ys = [r["quality"][metric]["value"] for r in pts]
        lo = [max(0.0, r["quality"][metric]["value"] - r["quality"][metric]["low"]) for r in pts]
        hi = [max(0.0, r["quality"][metric]["high"] - r["quality"][metric]["value"]) for r in pts]
        style = "o-" if len(pts) > 1 else "s"
        ax_k.errorbar(xs_k, ys, yerr=[lo, hi], fmt=style, capsize=3, label=name)
        ax_speed.errorbar([r["speed"]["tokens_per_second"] for r in pts], ys, yerr=[lo, hi], fmt=style, capsize=3,
                          label=name)
        for r, x, y in zip(pts, [r["speed"]["tokens_per_second"] for r in pts], ys, strict=True):
            if r["tokens_per_step"]:
                ax_speed.annotate(f"K={r['tokens_per_step']}", (x, y), textcoords="offset points", xytext=(4, 4),
                                  fontsize=7)
    if k1 is not None:
        ax_k.axhline(k1["quality"][metric]["value"], color="grey", ls=":", lw=1, label="K=1 (sequential)")
    ax_k.set_xlabel("tokens per step K (adaptive samplers: measured tokens per base pass)")
    ax_k.set_ylabel(LABELS[metric])
    ax_k.set_title("quality vs tokens per step")
    ax_speed.set_xlabel("tokens per second (this machine, same run)")
    ax_speed.set_ylabel(LABELS[metric])
    ax_speed.set_title("quality vs speed")
    for ax in (ax_k, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ORDER_PANELS = ("sequential K=1", "parallel K=4", "adjust K=4")


def plot_order(results: dict, path: Path, keys: tuple[str, ...] = ORDER_PANELS) -> None:
    """For a few samples: the step at which each position was filled (darker = earlier)."""
    histories = results.get("histories", {})
    panels = [k for k in keys if k in histories and histories[k]]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.3 + 1.1 * len(panels)), squeeze=False)
    for ax, key in zip(axes[:, 0], panels, strict=True):
        grid = np.ma.masked_less(np.asarray(histories[key]), 0)  # -1: after the text's end, never sampled
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"{key}: step at which each position was filled (blank: after the text's end, not sampled)",
                     fontsize=9)
        ax.set_ylabel("sample")
        ax.set_yticks(range(len(grid)))
        fig.colorbar(image, ax=ax, label="step", fraction=0.03)
    axes[-1, 0].set_xlabel("position in the generated region")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(results: dict, path: Path) -> None:
    """Every sampler as points of (cost, quality): base passes per sequence, and wall time per sequence."""
    rows = results["rows"]
    metric = _metric(rows)
    if metric is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    costs = (("all_passes", "model passes per sequence: base + extra (head / test / scorer passes counted as 1)"),
             ("ms_per_sequence", "wall time per sequence (ms, this machine, same run)"))
    families = sorted({r["sampler"].split(":")[0] for r in rows})
    markers = dict(zip(families, "osD^v<>pPX*h", strict=False))
    for ax, (key, label) in zip(axes, costs, strict=True):
        for spec in dict.fromkeys(r["sampler"] for r in rows):
            pts = [r for r in rows if r["sampler"] == spec]
            xs = [_cost(r, key) for r in pts]
            ys = [r["quality"][metric]["value"] for r in pts]
            ax.plot(xs, ys, marker=markers[spec.split(":")[0]], ls="-" if len(pts) > 1 else "", label=spec)
            for r, x, y in zip(pts, xs, ys, strict=True):
                if r["tokens_per_step"] and r["tokens_per_step"] > 1:
                    ax.annotate(f"K={r['tokens_per_step']}", (x, y), textcoords="offset points", xytext=(3, 3),
                                fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label + " (log scale)", fontsize=8)
        ax.set_ylabel(LABELS[metric])
        ax.grid(alpha=0.3, which="both")
    better = "down and left" if metric == "nll" else "up and left"
    axes[0].set_title(f"quality vs model passes ({better} is better)")
    axes[1].set_title(f"quality vs wall time ({better} is better)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the panel: it had covered points
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _cost(row: dict, key: str) -> float:
    speed = row["speed"]
    if key == "ms_per_sequence":
        return 1000 * speed["wall_time_s"] / max(1, speed["samples"])
    if key == "all_passes":
        return speed["base_passes_per_sample"] + speed["extra_passes_per_sample"]
    return speed[key]


def plot_all(results: dict, out: Path) -> None:
    """Each plot the grid has data for; one it has none for is removed, so no earlier run's plot is left beside
    these results."""
    for name, plot in (("quality.png", plot_quality), ("pareto.png", plot_pareto),
                       ("unmasking_order.png", plot_order)):
        (out / name).unlink(missing_ok=True)
        plot(results, out / name)
