"""The comparison table of ``fedrir compare``: one row per algorithm and uplink codec over its
seeds, as CSV and Markdown, and the mean accuracy curve per row."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedrir.config import Config
from fedrir.results import GENERALIZATION

COLUMNS = (
    "algorithm",
    "codec",
    "final_accuracy_mean",
    "final_accuracy_std",
    "best_accuracy_mean",
    "best_accuracy_std",
    "client_accuracy_std",
    "global_accuracy_mean",
    "global_accuracy_std",
    "new_client_accuracy_mean",
    "new_client_accuracy_std",
    "new_client_zero_shot_accuracy_mean",
    "new_client_zero_shot_accuracy_std",
    "new_client_full_accuracy_mean",
    "new_client_full_accuracy_std",
    "bytes_uploaded_per_round",
    "mb_uploaded_per_round",
    "mb_downloaded_per_round",
    "compression_up",
    "compression_down",
    "seconds_per_round",
    "codec_share",
    "shared_parameters",
    "private_parameters",
    "seeds",
    "partial_seeds",
    "diverged_seeds",
)
"""One row per algorithm and uplink codec. Accuracies are in %; ``*_std`` over seeds is the sample
std (None for a single seed); ``client_accuracy_std`` is the final round's spread across clients,
mean over seeds; bytes are the encoded bytes (MB = 10^6 bytes), ``compression_*`` how many times
fewer than without a codec, ``codec_share`` the codecs' share of the run's round time;
``partial_seeds`` counts the seeds whose final accuracy covers fewer clients than the federation
(clients that dropped out) and ``diverged_seeds`` the seeds whose run stopped at a non-finite
number (the row's numbers are over the others): such rows are not ranked with the others. The
global and new-client accuracies (see :data:`fedrir.results.GENERALIZATION`) are None where a
method has no such number (or a run predates them)."""


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def optional_mean_std(summaries: list[dict[str, Any]], key: str) -> tuple[float | None, ...]:
    """Mean and std over seeds of ``key`` in %, or (None, None) where a run has no number."""
    values = [s.get(key) for s in summaries]
    present = [100 * v for v in values if v is not None]
    return mean_std(present) if len(present) == len(values) else (None, None)


def algorithm_row(
    algorithm: str, codec: str, summaries: list[dict[str, Any]], diverged: int = 0
) -> dict[str, Any]:
    """The row of ``algorithm`` with uplink ``codec`` over its finished seeds' summaries (a run
    from before codecs existed has no raw byte counts: it sent them as they were), ``diverged``
    more seeds having stopped at a non-finite number. Beside :data:`COLUMNS`, ``unrecorded``
    names the generalization numbers some run's summary predates."""
    final_mean, final_std = mean_std([100 * s["final_accuracy"] for s in summaries])
    best_mean, best_std = mean_std([100 * s["best_accuracy"] for s in summaries])
    up = statistics.fmean(s["bytes_uploaded_per_round"] for s in summaries)
    down = statistics.fmean(s["bytes_downloaded"] / s["rounds"] for s in summaries)
    raw_up = sum(s.get("raw_bytes_uploaded", s["bytes_uploaded"]) for s in summaries)
    raw_down = sum(s.get("raw_bytes_downloaded", s["bytes_downloaded"]) for s in summaries)
    sent_up = sum(s["bytes_uploaded"] for s in summaries)
    sent_down = sum(s["bytes_downloaded"] for s in summaries)
    return {
        "algorithm": algorithm,
        "codec": codec,
        "final_accuracy_mean": final_mean,
        "final_accuracy_std": final_std,
        "best_accuracy_mean": best_mean,
        "best_accuracy_std": best_std,
        "client_accuracy_std": statistics.fmean(100 * s["client_accuracy_std"] for s in summaries),
        **{
            f"{name}_{stat}": value
            for name in GENERALIZATION
            for stat, value in zip(("mean", "std"), optional_mean_std(summaries, name), strict=True)
        },
        "bytes_uploaded_per_round": up,
        "mb_uploaded_per_round": up / 1e6,
        "mb_downloaded_per_round": down / 1e6,
        "compression_up": raw_up / sent_up if sent_up else 1.0,
        "compression_down": raw_down / sent_down if sent_down else 1.0,
        "seconds_per_round": statistics.fmean(s["seconds_per_round"] for s in summaries),
        "codec_share": statistics.fmean(s.get("codec_share", 0.0) for s in summaries),
        "shared_parameters": summaries[0]["parameters"]["shared"],
        "private_parameters": summaries[0]["parameters"]["private"],
        "seeds": len(summaries),
        "partial_seeds": sum(bool(s.get("final_accuracy_partial")) for s in summaries),
        "diverged_seeds": diverged,
        "unrecorded": tuple(n for n in GENERALIZATION if any(n not in s for s in summaries)),
    }


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by final accuracy, highest first; rows with a partial final accuracy or a diverged
    seed after all the others (their accuracies cover fewer clients or seeds: not comparable)."""
    return sorted(rows, key=lambda r: (_unranked(r), -r["final_accuracy_mean"]))


def _unranked(row: dict[str, Any]) -> bool:
    return row["partial_seeds"] > 0 or row["diverged_seeds"] > 0


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_mean_std(row: dict[str, Any], name: str) -> str:
    """A table row's ``<name>_mean ± <name>_std`` to two decimals (the mean alone for one seed,
    n/a where there is no mean, – where a run's records predate the number)."""
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if name in row.get("unrecorded", ()):
        return "–"
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


Column = tuple[str, Callable[[dict[str, Any]], str]]


def _columns(codecs: bool, new_clients: bool) -> list[Column]:
    """The Markdown table's columns: title and cell; the codec columns only where a codec is in
    use, the new-client columns only where clients were held out."""

    def acc(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: format_mean_std(r, name)

    return [
        (
            "algorithm",
            lambda r: (
                r["algorithm"]
                + (" †" if r["partial_seeds"] else "")
                + (" ‡" if r["diverged_seeds"] else "")
            ),
        ),
        *([("uplink", lambda r: r["codec"])] if codecs else []),
        ("final acc (%)", acc("final_accuracy")),
        ("best acc (%)", acc("best_accuracy")),
        ("client spread (%)", lambda r: f"{r['client_accuracy_std']:.2f}"),
        ("global acc (%)", acc("global_accuracy")),
        *(
            [
                ("new-client acc (%)", acc("new_client_accuracy")),
                ("new-client zero-shot (%)", acc("new_client_zero_shot_accuracy")),
            ]
            if new_clients
            else []
        ),
        ("upload / round (bytes)", lambda r: f"{r['bytes_uploaded_per_round']:,.0f}"),
        ("upload / round (MB)", lambda r: f"{r['mb_uploaded_per_round']:.3f}"),
        *(
            [
                ("download / round (MB)", lambda r: f"{r['mb_downloaded_per_round']:.3f}"),
                (
                    "ratio up / down",
                    lambda r: f"{r['compression_up']:.1f}× / {r['compression_down']:.1f}×",
                ),
            ]
            if codecs
            else []
        ),
        ("s / round", lambda r: f"{r['seconds_per_round']:.2f}"),
        *([("codec", lambda r: f"{100 * r['codec_share']:.1f} %")] if codecs else []),
        ("shared params", lambda r: f"{r['shared_parameters']:,}"),
        ("private params", lambda r: f"{r['private_parameters']:,}"),
        ("seeds", lambda r: str(r["seeds"])),
    ]


def to_markdown(
    rows: list[dict[str, Any]],
    config: Config,
    seeds: list[int],
    evaluated_on: str,
    command: str,
    files: tuple[str, str],
    diverged: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> str:
    """The table as Markdown, headed by the grid's command and settings; ``files`` names the
    grid's settings file and its runs folder, ``diverged`` the (seed, round) where each diverged
    run of a row stopped (a row none of whose seeds finished is not in ``rows``)."""
    grid, runs = files
    d = config.data
    codecs = config.downlink != "none" or any(r["codec"] != "none" for r in rows)
    columns = _columns(codecs, config.new_clients > 0)
    about = [
        f"Accuracy is personalized accuracy on the clients' own {evaluated_on} data (pooled over "
        "clients), in %, as mean ± sample std over seeds. Client spread is the std of per-client "
        "accuracy at the final round, mean over seeds. Global acc is the global model (where a "
        "method has one) on every client's test data at the final round.",
    ]
    if config.new_clients:
        about.append(
            f"New-client acc scores the {config.new_clients} clients held out of training after "
            f"{config.new_client_epochs} epoch(s) of training their private parts on the "
            "broadcast (zero-shot: before, with the global model)."
        )
    about.append("n/a: a method has no such number.")
    if any(r["unrecorded"] for r in rows):
        about.append("–: the runs' records predate that number.")
    if codecs:
        about.append(
            "Upload counts the bytes all clients send per round, as encoded by the uplink codec "
            "(MB = 10^6 bytes); download likewise, by the downlink codec; ratio is how many "
            "times fewer bytes than without a codec, up / down; codec is the encoding and "
            "decoding's share of the round time."
        )
    else:
        about.append("Upload counts the bytes all clients send per round (MB = 10^6 bytes).")
    about.append(
        "Every method is reported as measured, under the same settings and partitions. Rows are "
        "sorted by final accuracy, highest first (rows marked † or ‡, whose numbers cover fewer "
        "clients or seeds, after the others)."
    )
    lines = [
        f"# fedrir compare: {d.dataset}, {d.partition} partition, {d.clients} clients, "
        f"{config.rounds} rounds",
        "",
        f"Command: `{command}`",
        "",
        f"Settings: dataset `{d.dataset}` (fraction {d.fraction}), partition `{d.partition}`, "
        f"alpha {d.alpha}, clients {d.clients}, rounds {config.rounds}, "
        + (f"downlink `{config.downlink}`, " if codecs else "")
        + f"seeds {', '.join(map(str, seeds))}; all settings in `{grid}`, each run's files in "
        f"`{runs}/<algorithm>{'[-<codec>]' if codecs else ''}-seed<seed>/`.",
        "",
        " ".join(about),
        "",
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|"
        + "|".join("---" if title in ("algorithm", "uplink") else "---:" for title, _ in columns)
        + "|",
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    partial = [
        f"{r['algorithm']} ({r['partial_seeds']} of {r['seeds']})"
        for r in rows
        if r["partial_seeds"]
    ]
    if partial:
        lines += [
            "",
            "† Not ranked: the final accuracy covers fewer clients than the federation (clients "
            f"dropped out) in some seeds: {', '.join(partial)}. Listed after the complete rows.",
        ]
    if diverged:
        stops = "; ".join(
            f"{name} " + ", ".join(f"seed {seed} in round {r}" for seed, r in runs)
            for name, runs in diverged.items()
        )
        lines += [
            "",
            "‡ Not ranked: runs that diverged (stopped at a non-finite number) are not reported; "
            "a row's numbers are over its other seeds, and a method none of whose seeds "
            f"finished has no row. Diverged: {stops}.",
        ]
    return "\n".join(lines) + "\n"


def mean_curve(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Accuracy and loss per evaluated round, averaged over the seeds that evaluated it."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for rows in runs:
        for r in rows:
            by_round.setdefault(r["round"], []).append(r)
    return [
        {
            "round": round_,
            "accuracy": statistics.fmean(r["accuracy"] for r in rs),
            "loss": statistics.fmean(r["loss"] for r in rs),
        }
        for round_, rs in sorted(by_round.items())
    ]
