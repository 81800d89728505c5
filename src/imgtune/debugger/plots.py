"""PNG plots of saved tensors (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from imgtune.core.errors import ImgtuneError
from imgtune.debugger.store import REDUCTIONS, Trial


def plot_tensor(trial: Trial, name: str, out: Path, reduction: str = "mean") -> Path:
    """Draw `reduction` of tensor `name` over steps, one panel per mode, each on its own mode-step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not trial.has_tensor(name):
        known = ", ".join(trial.tensor_names()[:12])
        raise ImgtuneError(f"no tensor {name!r} in this job", f"known tensors include: {known}")
    if reduction not in REDUCTIONS:
        raise ImgtuneError(f"unknown reduction {reduction!r}", f"use one of {', '.join(REDUCTIONS)}")
    series = trial.tensor(name)
    modes = [m for m in ("train", "eval", "predict") if series.steps(m)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        records = series.by_mode[mode]
        steps = sorted(records)
        ax.plot(
            [records[s]["mode_step"] for s in steps],
            [records[s]["r"][reduction] for s in steps],
            marker="." if len(steps) < 60 else None,
            linewidth=1.2,
        )
        ax.set_title(f"{name} ({mode})")
        ax.set_xlabel(f"{mode} step")
        ax.set_ylabel(reduction)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
