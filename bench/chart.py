"""latest.png: ratio to copy floor per case, one bar per implementation, one panel per
operation and thread count. Black ticks mark batchnorm's target in each case.
"""
from __future__ import annotations

import pathlib

from .report import available_impls, op_thread_groups


# One colour per implementation whatever subset is available; none is the targets' black.
COLORS = {"batchnorm": "tab:blue", "torch": "tab:orange", "onnxruntime": "tab:green",
          "numpy": "tab:gray"}
# Ratios beyond this are clipped and printed: a 2-thread pathology at 1000x would
# otherwise squash the interesting range near 1 into a few pixels.
Y_RANGE = (0.25, 20.0)


def _panel(ax, cells: list[dict], names: list[str], width: float) -> None:
    for i, name in enumerate(names):
        for x, cell in enumerate(cells):
            result = cell["results"].get(name, {})
            if result.get("status") not in ("ok", "wrong"):
                continue
            ratio = result["ratio"]["median"]
            position = x - 0.4 + width * (i + 0.5)
            ax.bar(position, min(ratio, Y_RANGE[1]), width, color=COLORS.get(name),
                   label=name if x == 0 else None)
            if ratio > Y_RANGE[1]:
                ax.text(position, Y_RANGE[1], f"{ratio:.0f}", rotation=90, fontsize=6,
                        ha="center", va="top", color="white")
    for x, cell in enumerate(cells):
        ax.hlines(cell["target"], x - 0.45, x + 0.45, colors="black", linewidth=1.5)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_ylim(*Y_RANGE)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{c['label']} {c['layout']}" for c in cells], fontsize=7,
                       rotation=30, ha="right")
    ax.set_ylabel("time / copy floor")
    ax.grid(axis="y", which="both", alpha=0.3)


def write_png(results: dict, path: pathlib.Path) -> str | None:
    """Draw the chart; returns why it was not drawn (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except Exception as error:
        return f"chart skipped: matplotlib unavailable ({error})"

    names = available_impls(results)
    groups = op_thread_groups(results)
    ops = list(dict.fromkeys(op for op, _ in groups))
    thread_counts = sorted({t for _, t in groups})
    figure, axes = plt.subplots(len(ops), len(thread_counts), squeeze=False,
                                figsize=(9 * len(thread_counts), 4.2 * len(ops)))
    width = 0.8 / max(1, len(names))
    for row, op in enumerate(ops):
        for col, threads in enumerate(thread_counts):
            cells = [c for c in results["cells"] if c["op"] == op and c["threads"] == threads]
            _panel(axes[row][col], cells, names, width)
            axes[row][col].set_title(f"{results['ops'][op]['title']}, {threads} thread(s)",
                                     fontsize=10)
    axes[0][0].legend(fontsize=8, loc="upper left")
    dtype = results["config"]["dtype"]
    figure.suptitle(f"batchnorm benchmark ({dtype}): time / np.copyto of the same bytes; "
                    f"dashed = floor, black ticks = batchnorm target, clipped at "
                    f"{Y_RANGE[1]:g}x (value printed)", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.98))  # leave the suptitle its own line
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return None
