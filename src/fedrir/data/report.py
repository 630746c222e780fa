"""What a partition looks like: per-client sizes and label counts as JSON, a table, a heatmap.

The summary is plain data (what ``fedrir partition --json`` prints); the table and the heatmap are
made from it alone, so a saved summary can be redrawn without the dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedrir.data.federated import SPLITS, Partition
from fedrir.data.types import Dataset

TOP_LABELS = 4
"""How many of a client's largest classes the table lists."""
ANNOTATE_MAX_CELLS = 400
"""Heatmaps with more cells than this are not annotated with counts (they would be unreadable)."""


def partition_summary(dataset: Dataset, partition: Partition) -> dict[str, Any]:
    """Per-client split sizes and label counts (over all of the client's splits), JSON-able.

    Label keys are class indices as strings, with only non-zero counts. ``val`` is the size of the
    validation set carved from the training set (0 without one); ``domains`` appears for datasets
    with domains.
    """
    labels = dataset.labels.numpy()
    domains = None if dataset.domains is None else dataset.domains.numpy()
    clients = []
    for i in range(partition.num_clients):
        idx = np.concatenate([getattr(partition, f"{s}_idx")[i] for s in SPLITS])
        counts = np.bincount(labels[idx], minlength=dataset.num_classes)
        client: dict[str, Any] = {
            "id": i,
            "train": len(partition.train_idx[i]),
            "val": len(partition.val_idx[i]),
            "test": len(partition.test_idx[i]),
            "labels": {str(k): int(c) for k, c in enumerate(counts) if c},
        }
        if domains is not None:
            ids, n = np.unique(domains[idx], return_counts=True)
            names = dataset.domain_names
            client["domains"] = {
                names[d] if d < len(names) else str(d): int(c) for d, c in zip(ids, n, strict=True)
            }
        clients.append(client)
    return {
        "dataset": dataset.name,
        "num_classes": dataset.num_classes,
        "clients": clients,
        "total": len(labels),
    }


def format_partition_table(summary: dict[str, Any]) -> str:
    """A readable per-client table (sizes, number of classes, largest classes) and a totals line."""
    clients = summary["clients"]
    with_val = any(c.get("val", 0) for c in clients)
    with_domains = any("domains" in c for c in clients)
    head = ["client", "train"] + (["val"] if with_val else []) + ["test", "classes"]
    head += ["domain"] if with_domains else []
    rows = []
    for c in clients:
        top = sorted(c["labels"].items(), key=lambda kv: (-kv[1], int(kv[0])))
        labels = " ".join(f"{k}:{v}" for k, v in top[:TOP_LABELS])
        labels += " …" if len(top) > TOP_LABELS else ""
        row = [str(c["id"]), str(c["train"])] + ([str(c["val"])] if with_val else [])
        row += [str(c["test"]), str(len(c["labels"]))]
        row += ["+".join(c.get("domains", {})) or "-"] if with_domains else []
        rows.append([*row, labels])
    used = {k for c in clients for k in c["labels"]}
    total = ["total", str(sum(c["train"] for c in clients))]
    total += [str(sum(c["val"] for c in clients))] if with_val else []
    total += [str(sum(c["test"] for c in clients)), str(len(used))]
    total += [""] if with_domains else []
    total.append(f"{summary['total']} samples, {len(clients)} clients, {summary['dataset']}")
    head.append("largest classes (class:count)")

    table = [head, *rows, total]
    widths = [max(len(r[j]) for r in table) for j in range(len(head) - 1)]

    def line(r: list[str]) -> str:
        return "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1]

    rule = "-" * (sum(widths) + 2 * len(widths) + len(head[-1]))
    return "\n".join([line(head), rule, *map(line, rows), rule, line(total)])


def plot_partition_heatmap(summary: dict[str, Any], path: str | Path) -> Path:
    """Write a classes × clients heatmap of sample counts as a PNG (counts written in if small)."""
    # The object-oriented API with no pyplot: no global backend switch, nothing left open.
    from matplotlib.figure import Figure

    clients = summary["clients"]
    k, m = summary["num_classes"], len(clients)
    counts = np.zeros((k, m), dtype=np.int64)
    for j, c in enumerate(clients):
        for label, n in c["labels"].items():
            counts[int(label), j] = n

    fig = Figure(figsize=(min(max(4.0, 0.45 * m + 2.0), 24.0), min(max(3.0, 0.3 * k + 1.5), 16.0)))
    ax = fig.add_subplot()
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel("client")
    ax.set_ylabel("class")
    ax.set_title(f"{summary['dataset']}: samples per class and client")
    if m <= 40:
        ax.set_xticks(range(m))
    if k <= 40:
        ax.set_yticks(range(k))
    if k * m <= ANNOTATE_MAX_CELLS:
        bright = counts.max() / 2
        for (y, x), n in np.ndenumerate(counts):
            if n:
                color = "black" if n > bright else "white"
                ax.text(x, y, str(n), ha="center", va="center", fontsize=6, color=color)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out
