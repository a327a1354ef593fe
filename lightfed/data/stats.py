"""What a partition looks like: client sizes, per-client label histograms, how non-IID it is.

:func:`partition_statistics` computes the numbers and :func:`format_statistics` prints them as a table.
:func:`plot_partition` draws the whole population as a heatmap (every client, sorted by its dominant class
and size, with class names and client sizes); :func:`log_partition` puts that heatmap and the table into a
run's TensorBoard. :func:`plot_label_distribution` is the older stacked-bar view of the first clients.
Figures are Matplotlib figures a caller may save or hand to ``SummaryWriter.add_figure``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightfed.data.datamodule import FederatedDataModule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "class_names", "client_order", "format_statistics", "log_partition", "partition_statistics", "plot_label_distribution",
    "plot_partition",
]

#: Fashion-MNIST's labels 0-9 (Xiao et al. 2017).
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_MATPLOTLIB_HINT = 'needs matplotlib: `pip install matplotlib` (or, in a checkout, `pip install -e ".[plot]"`).'



def _label_histogram(dm: FederatedDataModule) -> tuple[Tensor, int]:
    """``(clients x classes)`` label counts over each client's examples (train and val together)."""
    dm.setup()
    assert dm.partition is not None
    labels, num_classes = dm.partition_labels()
    labels = labels.cpu()
    num_classes = num_classes or int(labels.max()) + 1
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
            f"plot_label_distribution {_MATPLOTLIB_HINT}"
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


def class_names(dm: FederatedDataModule, num_classes: int) -> list[str]:
    """Readable names of ``dm``'s classes: the genres of the Shakespeare plays, Fashion-MNIST's clothing
    classes, else the class ids ``"0"``, ``"1"``, ...; a datamodule may also set ``class_names`` itself."""
    from lightfed.data.datasets import FashionMNISTDataModule
    from lightfed.data.text import ShakespeareLinesDataModule

    names: list[str] = list(vars(dm).get("class_names") or [])
    if not names and isinstance(dm, ShakespeareLinesDataModule):
        names = list(dm.genres)
    elif not names and isinstance(dm, FashionMNISTDataModule):
        names = list(FASHION_MNIST_CLASSES)
    return names if len(names) == num_classes else [str(k) for k in range(num_classes)]


def client_order(hist: Tensor) -> Tensor:
    """Clients sorted by their dominant class, then by size (largest first), then by id.

    Sorted so, a label-skewed partition shows as blocks along the diagonal and an IID one as flat stripes.
    """
    sizes = hist.sum(1)
    dominant = hist.argmax(1)
    ids = torch.arange(hist.shape[0])
    keys = sorted(range(hist.shape[0]), key=lambda i: (int(dominant[i]), -int(sizes[i]), int(ids[i])))
    return torch.tensor(keys, dtype=torch.long)


def plot_partition(dm: FederatedDataModule, path: str | None = None, stats: dict[str, Any] | None = None) -> Figure:
    """Draw every client's label mix as a heatmap, with the client sizes underneath.

    Rows are classes (by name, see :func:`class_names`), columns are all clients ordered by
    :func:`client_order`; a cell's colour is the share of the client's examples (train and val) in that
    class. The bars below give each client's number of examples, in the same order.

    Args:
        dm: A federated datamodule (``dm.setup()`` is run if needed).
        path: Save the figure as a PNG here if given.
        stats: :func:`partition_statistics` of ``dm`` if already computed.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: If Matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"plot_partition {_MATPLOTLIB_HINT}") from err
    stats = stats if stats is not None else partition_statistics(dm)
    hist: Tensor = stats["label_histogram"]
    order = client_order(hist)
    counts = hist[order].double()
    sizes = counts.sum(1)
    share = (counts / sizes.clamp_min(1)[:, None]).T.numpy()  # classes x clients
    names = class_names(dm, hist.shape[1])
    num_clients, num_classes = hist.shape[0], hist.shape[1]
    fig = Figure(figsize=(min(16.0, max(6.0, 0.08 * num_clients + 3)), 2.0 + 0.25 * num_classes + 1.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[max(2.0, 0.25 * num_classes), 1.2])
    image = top.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0,
                       extent=(-0.5, num_clients - 0.5, num_classes - 0.5, -0.5))
    if num_classes <= 40:
        top.set_yticks(range(num_classes), names, fontsize="small")
    top.set_ylabel("class")
    top.set_title(
        f"{num_clients} clients, sorted by dominant class and size; mean TV distance to the global label mix "
        f"{stats['mean_tv_distance']:.3f}", fontsize="medium",
    )
    fig.colorbar(image, ax=top, label="share of the client's examples")
    bottom.bar(range(num_clients), sizes.numpy(), width=1.0, color="0.35")
    bottom.set_xlim(-0.5, num_clients - 0.5)
    bottom.set_xlabel("client (sorted)")
    bottom.set_ylabel("examples")
    if num_clients <= 60:
        bottom.set_xticks(range(num_clients), [str(int(i)) for i in order], fontsize="x-small", rotation=90)
    if path is not None:
        fig.savefig(path, format="png", dpi=100)
    return fig


def log_partition(logger: Any, dm: FederatedDataModule, stats: dict[str, Any] | None = None, step: int = 0) -> bool:
    """Write the partition heatmap (tag ``data/partition``) and its table (``data/partition_stats``) to TensorBoard.

    For a run's set-up: does nothing (and returns ``False``) without a logger that has a TensorBoard
    ``experiment``, or without Matplotlib (the table is still written).

    Args:
        logger: A Lightning logger (``TensorBoardLogger``), or ``None``.
        dm: The run's federated datamodule.
        stats: :func:`partition_statistics` of ``dm`` if already computed.
        step: The global step to log at.

    Returns:
        Whether the heatmap was written.
    """
    experiment = getattr(logger, "experiment", None) if logger is not None else None
    if experiment is None or not hasattr(experiment, "add_figure"):
        return False
    stats = stats if stats is not None else partition_statistics(dm)
    experiment.add_text("data/partition_stats", "```\n" + format_statistics(stats) + "\n```", global_step=step)
    try:
        fig = plot_partition(dm, stats=stats)
    except ImportError:
        experiment.flush()
        return False
    experiment.add_figure("data/partition", fig, global_step=step)
    experiment.flush()
    return True
