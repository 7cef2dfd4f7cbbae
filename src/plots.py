"""Pictures of mixed-precision runs (matplotlib, optional: without it each plot is skipped
with one message per process). Every PNG is written to a temporary name and renamed."""
import sys

from .utils import atomic_output

_warned = []


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (saying once that plots are skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            print("matplotlib is not installed: plots are skipped (pip install matplotlib)", file=sys.stderr,
                  flush=True)
            _warned.append(True)
        return None
    return plt


def _save(fig, plt, path):
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def plot_bits(report, path, title=""):
    """Bits of each module (bars, left axis) with its sensitivity beside them (bars, right axis),
    from a mixed-precision report (search_bits or refined_search). Returns path, or None if skipped."""
    plt = _pyplot()
    if plt is None:
        return None
    names = list(report["modules"])
    bits = [report["modules"][n] for n in names]
    sens = [report["sensitivity"][n] for n in names]
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(names) + 2), 4.2))
    ax.bar([i - 0.2 for i in x], bits, width=0.4, color="tab:blue", label="bits")
    ax.axhline(report["nominal_bits"], color="tab:blue", ls="--", lw=0.8, label=f"nominal {report['nominal_bits']}")
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(report["candidates"]) + 1)
    ax2 = ax.twinx()
    ax2.bar([i + 0.2 for i in x], sens, width=0.4, color="tab:orange", label="sensitivity")
    ax2.set_ylabel(f"sensitivity ({report.get('criterion', 'paper')})", color="tab:orange")
    ax.set_xticks(x)
    ax.set_xticklabels([n.replace("blocks.", "b") for n in names], rotation=45, ha="right")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    meaning = report.get("sensitivity_meaning", "")
    ax.set_title((title + "\n" if title else "") + meaning, fontsize=9)
    fig.tight_layout()
    _save(fig, plt, path)
    return path


def plot_accuracy_size(rows, path, title="top-1 against model size"):
    """Accuracy-versus-size plot. rows: dicts with label, size_mb, top1 and mp (bool): uniform
    rows of one label are joined by a line, mixed-precision rows are markers. Returns path or None."""
    plt = _pyplot() if rows else None
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    uniform = {}
    for r in rows:
        if not r["mp"]:
            uniform.setdefault(r["label"], []).append(r)
    for label, rs in uniform.items():
        rs = sorted(rs, key=lambda r: r["size_mb"])
        ax.plot([r["size_mb"] for r in rs], [r["top1"] for r in rs], "o-", label=f"{label} uniform", ms=4)
        for r in rs:
            ax.annotate(r.get("tag", ""), (r["size_mb"], r["top1"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
    markers = iter("s^Dv<>P*X")
    mp_labels = {}
    for r in rows:
        if r["mp"]:
            mp_labels.setdefault(r["label"], []).append(r)
    for label, rs in mp_labels.items():
        ax.plot([r["size_mb"] for r in rs], [r["top1"] for r in rs], next(markers, "s"), ls="none", ms=7,
                label=label)
        for r in rs:
            ax.annotate(r.get("tag", ""), (r["size_mb"], r["top1"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set_xlabel("model_size_mb (the paper's measure: weights at their width, other parameters at 32 bits)",
                  fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, plt, path)
    return path


def plot_pair_grid(panels, w_bits, a_bits, path, title=""):
    """Heat maps of a bit-pair grid, one panel per (title, {(w, a): value}) in `panels` (rows:
    weight bits, columns: activation bits), each cell annotated with its value; a missing pair
    is blank. The values are differences to full precision (points), so the colour scale is
    centred on 0. Returns path, or None if skipped."""
    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np
    n = len(panels)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows + 0.6), squeeze=False)
    values = [v for _, cells in panels for v in cells.values() if v is not None]
    lim = min(max([abs(v) for v in values] + [0.1]), 3.0)  # beyond 3 points: full colour, the text says how far
    for ax, (name, cells) in zip(axes.ravel(), panels):
        grid = np.full((len(w_bits), len(a_bits)), np.nan)
        for i, w in enumerate(w_bits):
            for j, a in enumerate(a_bits):
                if cells.get((w, a)) is not None:
                    grid[i, j] = cells[(w, a)]
                    dark = abs(grid[i, j]) > 0.6 * lim  # white text where the cell's colour is deep
                    ax.text(j, i, f"{grid[i, j]:+.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(a_bits)), [f"A{a}" for a in a_bits], fontsize=8)
        ax.set_yticks(range(len(w_bits)), [f"W{w}" for w in w_bits], fontsize=8)
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, plt, path)
    return path
