"""What a partition looks like: client sizes, per-client label histograms, how non-IID it is.

:func:`partition_statistics` computes the numbers, :func:`format_statistics` prints them as a table, and
:func:`plot_label_distribution` draws per-client label counts as a stacked bar chart (a Matplotlib figure a
caller may save or hand to ``SummaryWriter.add_figure``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightfed.data.datamodule import FederatedDataModule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["format_statistics", "partition_statistics", "plot_label_distribution"]


def _label_histogram(dm: FederatedDataModule) -> tuple[Tensor, int]:
    """``(clients x classes)`` label counts over each client's examples (train and val together)."""
    dm.setup()
    assert dm.arrays is not None and dm.partition is not None
    labels = dm.arrays.labels.cpu()
    num_classes = dm.arrays.num_classes or int(labels.max()) + 1
    part = dm.partition
    client_of = torch.repeat_interleave(torch.arange(part.num_clients), part.sizes().cpu())
    flat = client_of * num_classes + labels[part.indices.cpu()]
    hist = torch.bincount(flat, minlength=part.num_clients * num_classes)
    return hist.reshape(part.num_clients, num_classes), num_classes


def _size_summary(sizes: Tensor, prefix: str) -> dict[str, float | int]:
    s = sizes.double()
    return {
        f"total_{prefix}": int(sizes.sum()),
        f"min_{prefix}": int(sizes.min()),
        f"median_{prefix}": float(s.quantile(0.5)),
        f"max_{prefix}": int(sizes.max()),
        f"mean_{prefix}": float(s.mean()),
        f"std_{prefix}": float(s.std(unbiased=False)),
    }


def partition_statistics(dm: FederatedDataModule) -> dict[str, Any]:
    """Summarise how ``dm``'s training set is split into clients (runs ``dm.setup()`` if needed).

    Label statistics count each client's examples, training and validation split together. With
    :math:`p_i` the label distribution of client :math:`i` and :math:`q` that of all partitioned examples,
    the non-IID measure is the mean total-variation distance
    :math:`\\bar d = \\frac1N \\sum_i \\tfrac12 \\lVert p_i - q \\rVert_1` (0 for IID, near 1 when clients hold
    disjoint labels), and the effective number of classes of a client is :math:`\\exp H(p_i)`.

    Args:
        dm: A federated datamodule.

    Returns:
        A dict with ``num_clients``, ``num_classes``; ``total_train``, ``min_train``, ``median_train``,
        ``max_train``, ``mean_train``, ``std_train`` (and the same with ``_val``); ``train_sizes`` and
        ``val_sizes`` (int64 tensors, one entry per client); ``label_histogram`` (``(clients x classes)``
        int64 tensor); ``global_label_distribution`` (float64 tensor); ``classes_per_client`` (int64),
        ``effective_classes`` and ``tv_distance`` (float64 tensors, per client); and their means
        ``mean_classes_per_client``, ``mean_effective_classes``, ``mean_tv_distance``.
    """
    hist, num_classes = _label_histogram(dm)
    assert dm.train_part is not None and dm.val_part is not None
    train_sizes, val_sizes = dm.train_part.sizes().cpu(), dm.val_part.sizes().cpu()
    counts = hist.double()
    p = counts / counts.sum(1, keepdim=True)
    q = counts.sum(0) / counts.sum()
    tv = 0.5 * (p - q).abs().sum(1)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    effective = torch.exp(-plogp.sum(1))
    classes = (hist > 0).sum(1)
    return {
        "num_clients": int(hist.shape[0]),
        "num_classes": num_classes,
        **_size_summary(train_sizes, "train"),
        **_size_summary(val_sizes, "val"),
        "train_sizes": train_sizes,
        "val_sizes": val_sizes,
        "label_histogram": hist,
        "global_label_distribution": q,
        "classes_per_client": classes,
        "effective_classes": effective,
        "tv_distance": tv,
        "mean_classes_per_client": float(classes.double().mean()),
        "mean_effective_classes": float(effective.mean()),
        "mean_tv_distance": float(tv.mean()),
    }


def format_statistics(stats: dict[str, Any], max_rows: int = 20) -> str:
    """A readable summary of :func:`partition_statistics`: totals, then one row per client.

    Per-class counts are shown for up to 20 classes. With more than ``max_rows`` clients, the first
    ``max_rows`` rows are shown and the rest are counted.
    """
    lines = [
        f"clients: {stats['num_clients']}   classes: {stats['num_classes']}",
        "train per client: total {total_train}  min {min_train}  median {median_train:g}  max {max_train}  "
        "mean {mean_train:.1f}  std {std_train:.1f}".format(**stats),
        "val per client:   total {total_val}  min {min_val}  median {median_val:g}  max {max_val}  "
        "mean {mean_val:.1f}".format(**stats),
        "labels: classes/client {mean_classes_per_client:.2f}  effective {mean_effective_classes:.2f}  "
        "mean TV distance to global {mean_tv_distance:.3f}".format(**stats),
    ]
    hist: Tensor = stats["label_histogram"]
    show_classes = hist.shape[1] <= 20
    cols = ["client", "train", "val", "classes", "TV"] + (
        [str(k) for k in range(hist.shape[1])] if show_classes else []
    )
    rows = []
    for i in range(min(stats["num_clients"], max_rows)):
        row = [
            str(i),
            str(int(stats["train_sizes"][i])),
            str(int(stats["val_sizes"][i])),
            str(int(stats["classes_per_client"][i])),
            f"{float(stats['tv_distance'][i]):.3f}",
        ]
        rows.append(row + ([str(int(c)) for c in hist[i]] if show_classes else []))
    widths = [max(len(c), *(len(r[j]) for r in rows)) if rows else len(c) for j, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)
    if stats["num_clients"] > max_rows:
        lines.append(f"... ({stats['num_clients'] - max_rows} more clients)")
    return "\n".join(lines)


def plot_label_distribution(
    dm: FederatedDataModule, path: str | None = None, max_clients: int = 50
) -> Figure:
    """Draw each client's label counts as a stacked bar (one colour per class).

    The figure is built on Matplotlib's Agg canvas without touching ``pyplot`` state, so it works headless.

    Args:
        dm: A federated datamodule (``dm.setup()`` is run if needed).
        path: Save the figure as a PNG here if given.
        max_clients: Plot only the first ``max_clients`` clients.

    Returns:
        The ``matplotlib.figure.Figure`` (e.g. for ``SummaryWriter.add_figure``).

    Raises:
        ImportError: If Matplotlib is not installed.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_label_distribution needs matplotlib: `pip install matplotlib` (or `pip install lightfed[test]`)."
        ) from err
    if max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}.")
    hist, num_classes = _label_histogram(dm)
    shown = hist[:max_clients].numpy()
    fig = Figure(figsize=(max(6.0, 0.2 * len(shown) + 2), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    bottom = shown[:, 0] * 0
    for k in range(num_classes):
        ax.bar(
            range(len(shown)), shown[:, k], bottom=bottom, width=0.85, color=cmap(k % cmap.N), label=str(k)
        )
        bottom = bottom + shown[:, k]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    title = f"Label distribution of {len(shown)}"
    ax.set_title(title + (f" of {hist.shape[0]} clients" if hist.shape[0] > len(shown) else " clients"))
    if num_classes <= 20:
        ax.legend(title="label", fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    if path is not None:
        fig.savefig(path, format="png", dpi=100)
    return fig
