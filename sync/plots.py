"""PNG pictures for reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_gpu_loads"]


def plot_gpu_loads(before: np.ndarray, after: np.ndarray, path: str | Path, title: str = "") -> None:
    """Bars of per-GPU load (summed over layers) before and after rebalancing, with the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, loads, name in ((axes[0], before, "before"), (axes[1], after, "after")):
        total = loads.sum(axis=0)
        ax.bar(np.arange(len(total)), total, color="#4c72b0" if name == "before" else "#55a868")
        ax.axhline(total.mean(), color="black", linestyle="--", linewidth=1, label="mean")
        ax.set_title(f"{name}: max/mean {total.max() / max(total.mean(), 1e-30):.3f}")
        ax.set_xlabel("GPU (EP rank)")
        ax.legend()
    axes[0].set_ylabel("tokens (summed over MoE layers)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
