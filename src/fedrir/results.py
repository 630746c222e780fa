"""Results are data: a per-round history (``metrics.jsonl``), a ``summary.json``, and plots made
from those files. Both engines (in-process and Flower) write through this module."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedrir.algorithms.base import Evaluation, NewClientEvaluation
from fedrir.errors import FedrirError


@dataclass(frozen=True)
class RoundRecord:
    """One evaluated round. Byte counts and ``seconds`` are this round's; ``*_total`` and
    ``elapsed`` are cumulative. ``bytes_*`` count the encoded tensors handed over (equal on both
    engines), ``raw_bytes_*`` the same before encoding, ``message_bytes_*`` what the transport
    carried for them (see :mod:`fedrir.engine.ledger`). Times cover training, aggregation and
    evaluation; writing checkpoints and loading data are not in them (the summary's
    ``wall_seconds`` has everything)."""

    round: int
    accuracy: float
    loss: float
    client_accuracies: dict[str, float]
    """Each evaluated client's accuracy, keyed by its id."""
    client_accuracy_std: float
    participants: int
    selected: int
    evaluated: int
    """How many clients ``accuracy`` covers (every client on the last round)."""
    bytes_up: int
    bytes_down: int
    message_bytes_up: int
    message_bytes_down: int
    raw_bytes_up: int
    """Bytes of the uploads before the uplink codec (``bytes_up`` is what it sent)."""
    raw_bytes_down: int
    compression_up: float
    """``raw_bytes_up / bytes_up``: how many times fewer bytes went up (1.0: no codec)."""
    compression_down: float
    codec_seconds: float
    """Seconds spent encoding and decoding this round (a part of ``seconds``)."""
    bytes_up_total: int
    bytes_down_total: int
    seconds: float
    elapsed: float
    train: dict[str, float] = field(default_factory=dict)
    global_accuracy: float | None = None
    """The global model on the pooled test sets of the evaluated and the new clients, on
    generalization rounds (see :func:`generalization`); None where the method has none."""
    new_client_accuracy: float | None = None
    """New clients after adapting their private parts, pooled; None without new clients."""
    new_client_zero_shot_accuracy: float | None = None
    new_client_full_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pooled(evaluations: Mapping[int, Evaluation]) -> dict[str, Any]:
    """Personalized accuracy Σ correct / Σ test samples, mean loss, and the per-client spread;
    each client's accuracy keyed by its id (as a string: JSON object keys), in id order."""
    counts = [evaluations[c] for c in sorted(evaluations)]
    correct = sum(e.correct for e in counts)
    total = sum(e.total for e in counts)
    accs = [e.accuracy for e in counts]
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return {
        "accuracy": correct / total if total else 0.0,
        "loss": sum(e.loss_sum for e in counts) / total if total else 0.0,
        "client_accuracies": {str(c): evaluations[c].accuracy for c in sorted(evaluations)},
        "client_accuracy_std": std,
    }


def pooled_accuracy(evaluations: Sequence[Evaluation | None]) -> float | None:
    """Σ correct / Σ samples; None when there is nothing to pool or a part is n/a (None)."""
    if not evaluations or any(e is None for e in evaluations):
        return None
    counts = [e for e in evaluations if e is not None]
    total = sum(e.total for e in counts)
    return sum(e.correct for e in counts) / total if total else 0.0


def generalization(
    global_evaluations: Mapping[int, Evaluation | None],
    new_clients: Mapping[int, NewClientEvaluation],
) -> dict[str, Any]:
    """A generalization round's numbers: the global model on every client scored (its zero-shot
    on the new ones), and the new clients' zero-shot, adapted and fully trained accuracies."""
    new = [new_clients[c] for c in sorted(new_clients)]
    zero_shot = [n.zero_shot for n in new]
    return {
        "global_accuracy": pooled_accuracy(
            [global_evaluations[c] for c in sorted(global_evaluations)] + zero_shot
        ),
        "new_client_accuracy": pooled_accuracy([n.adapted for n in new]),
        "new_client_zero_shot_accuracy": pooled_accuracy(zero_shot),
        "new_client_full_accuracy": pooled_accuracy([n.full for n in new]),
    }


GENERALIZATION = (
    "global_accuracy",
    "new_client_accuracy",
    "new_client_zero_shot_accuracy",
    "new_client_full_accuracy",
)
"""The generalization numbers of a record, and of a summary (its last round's)."""


def weighted_metrics(metrics: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, float]:
    """Training metrics of the clients that took part, weighted by their sample counts."""
    total = sum(n for _, n in metrics)
    if not total:
        return {}
    keys = sorted({k for m, _ in metrics for k in m})
    return {k: sum(m.get(k, 0.0) * n for m, n in metrics) / total for k in keys}


def summarize(
    records: Sequence[RoundRecord], clients: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """The run's headline numbers: final *and* best accuracy, the spread, bytes and time.
    ``final_accuracy_clients`` says how many of the ``clients`` the final accuracy covers, and
    ``final_accuracy_partial`` flags a final accuracy over fewer (clients that dropped out)."""
    last = records[-1]
    best = max(records, key=lambda r: r.accuracy)
    seconds = last.elapsed
    return {
        "final_accuracy": last.accuracy,
        "final_accuracy_clients": last.evaluated,
        "final_accuracy_partial": last.evaluated < clients,
        "best_accuracy": best.accuracy,
        "best_round": best.round,
        "final_loss": last.loss,
        "client_accuracy_std": last.client_accuracy_std,
        "rounds": last.round,
        "bytes_uploaded": last.bytes_up_total,
        "bytes_downloaded": last.bytes_down_total,
        "bytes_uploaded_per_round": last.bytes_up_total / last.round,
        "seconds": seconds,
        "seconds_per_round": seconds / last.round,
        **{name: getattr(last, name) for name in GENERALIZATION},
        **extra,
    }


def atomic_write(path: Path, text: str) -> None:
    """Write a whole file so that a reader (or a crash) sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the new name itself durable, before anything relies on it
        os.fsync(directory)
    finally:
        os.close(directory)


def strict_json(value: Any, indent: int | None = None) -> str:
    """``value`` as strict JSON: every result file is written through here, and a non-finite
    number (which strict readers reject) is refused rather than written as a bare NaN."""
    try:
        return json.dumps(value, indent=indent, allow_nan=False)
    except ValueError:
        raise FedrirError(
            "refusing to write a non-finite number into a result file; this is a bug, please "
            "report it with the command that led here"
        ) from None


def write_metrics(path: Path, records: Iterable[RoundRecord]) -> None:
    atomic_write(path, "".join(strict_json(r.to_json()) + "\n" for r in records))


def append_metrics(path: Path, record: RoundRecord) -> None:
    line = strict_json(record.to_json()) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def line_looks(n: int) -> list[tuple[str, str]]:
    """``n`` (colour, line style) pairs, all different up to 40: ten colours solid, then the same
    ten dashed, dotted, dash-dotted (matplotlib's default cycle repeats colours after ten, so a
    grid of 13 algorithms drew three pairs of them alike)."""
    styles = ("-", "--", ":", "-.")
    return [(f"C{i % 10}", styles[i // 10 % len(styles)]) for i in range(n)]


def plot_curves(series: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> None:
    """Accuracy and loss over rounds, one line per named series (a run, or an algorithm)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for (name, rows), (colour, style) in zip(series.items(), line_looks(len(series)), strict=True):
        rounds = [r["round"] for r in rows]
        look = {
            "color": colour,
            "linestyle": style,
            "marker": "." if len(rows) <= 30 else None,
            "label": name,
        }
        ax_acc.plot(rounds, [100 * r["accuracy"] for r in rows], **look)
        ax_loss.plot(rounds, [r["loss"] for r in rows], **look)
    ax_acc.set(xlabel="round", ylabel="personalized accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="round", ylabel="test loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    if len(series) > 1:  # one legend beside both panels, where it hides no curve
        fig.legend(*ax_acc.get_legend_handles_labels(), loc="center right", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.88, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable table of a run's summary."""
    final = f"{100 * summary['final_accuracy']:.2f} %"
    if summary["final_accuracy_partial"]:
        final += (
            f" (PARTIAL: over {summary['final_accuracy_clients']} of {summary['clients']} "
            "clients; the others dropped out)"
        )
    rows = [
        ("final accuracy", final),
        (
            "best accuracy",
            f"{100 * summary['best_accuracy']:.2f} % (round {summary['best_round']})",
        ),
        ("client accuracy std", f"{100 * summary['client_accuracy_std']:.2f} %"),
        *[
            (name.replace("_", " "), f"{100 * summary[name]:.2f} %")
            for name in GENERALIZATION
            if summary.get(name) is not None
        ],
        ("rounds", str(summary["rounds"])),
        ("uploaded", f"{summary['bytes_uploaded'] / 2**20:.1f} MiB"),
        ("downloaded", f"{summary['bytes_downloaded'] / 2**20:.1f} MiB"),
        ("time", f"{summary['seconds']:.1f} s ({summary['seconds_per_round']:.1f} s/round)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
