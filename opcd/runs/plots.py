"""PNG plots of run artefacts (headless: the Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Lay out, write and release a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_extraction(records: list[dict], path: Path, metric_name: str = "held-out score") -> Path:
    """One line per seed: held-out score after each number of stream items (0 = no experience);
    the selected experience is marked when a record has "best": True."""
    import matplotlib.ticker

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for seed in sorted({r["seed"] for r in records}):
        rows = sorted((r for r in records if r["seed"] == seed), key=lambda r: r["step"])
        ax.plot([r["step"] for r in rows], [r["score"] for r in rows], marker="o", label=f"seed {seed}")
    for r in records:
        if r.get("best"):
            ax.scatter([r["step"]], [r["score"]], s=160, facecolors="none", edgecolors="black", zorder=3,
                       label="selected")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("stream items consumed")
    ax.set_ylabel(metric_name)
    ax.set_title("experience extraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)
