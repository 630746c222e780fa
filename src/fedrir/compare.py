"""``fedrir compare``: every algorithm × seed on the same settings, then one table and one plot.

The partition depends only on the data settings and the seed, so runs that share a seed train and
test every algorithm on the same clients' data. Each run is an ordinary run folder,
``DIR/runs/<algorithm>-seed<seed>/``, resumable on its own. ``DIR/compare.toml`` records the grid's
settings, so that rerunning the command continues the grid (finished runs are kept, unfinished ones
resumed) and never mixes results obtained under different settings.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedrir import api
from fedrir.algorithms import get_algorithm
from fedrir.config import (
    KEYS,
    Config,
    config_to_toml,
    flat_value,
    load_config,
    with_overrides,
)
from fedrir.errors import ConfigError, FedrirError
from fedrir.results import RoundRecord, atomic_write, make_out_dir, plot_curves, read_metrics

GRID, RUNS, RESULTS_CSV, RESULTS_MD, CURVES = (
    "compare.toml",
    "runs",
    "results.csv",
    "results.md",
    "curves.png",
)
PER_RUN = ("algorithm", "seed")
"""Keys the grid sets per run; every other key is shared by all runs of a compare."""

COLUMNS = (
    "algorithm",
    "final_accuracy_mean",
    "final_accuracy_std",
    "best_accuracy_mean",
    "best_accuracy_std",
    "client_accuracy_std",
    "bytes_uploaded_per_round",
    "mb_uploaded_per_round",
    "seconds_per_round",
    "shared_parameters",
    "private_parameters",
    "seeds",
)
"""One row per algorithm. Accuracies are in %; ``*_std`` over seeds is the sample std (None for
a single seed); ``client_accuracy_std`` is the final round's spread across clients, mean over
seeds."""


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--seeds wants comma-separated non-negative integers such as 0,1,2; got {text!r}"
        ) from None
    return check_seeds(seeds)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    if not seeds:
        raise ConfigError("give at least one seed")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct non-negative integers; got {list(seeds)}")
    return list(seeds)


def check_algorithms(algorithms: Sequence[str]) -> list[str]:
    """Every name resolved before anything runs, so a typo costs nothing."""
    names = [a.strip() for a in algorithms if a.strip()]
    if not names:
        raise ConfigError("give at least one algorithm")
    if len(set(names)) != len(names):
        raise ConfigError(f"algorithms must be distinct; got {', '.join(names)}")
    for name in names:
        get_algorithm(name)
    return names


def run_dir(out: Path, algorithm: str, seed: int) -> Path:
    return out / RUNS / f"{algorithm}-seed{seed}"


def _claim(out: Path, config: Config, algorithms: list[str], seeds: list[int]) -> None:
    """Make ``out`` this grid's folder, or check that it already is one with the same settings.
    A grid whose first run never started (a typo, data not there) takes the new settings."""
    grid = out / GRID
    started = any((out / RUNS).glob(f"*/{api.CONFIG}"))
    if grid.exists() and started:
        stored = load_config(grid)
        differ = [
            f"{name}: {flat_value(stored, name)!r} there, {flat_value(config, name)!r} here"
            for name in KEYS
            if name not in PER_RUN and flat_value(stored, name) != flat_value(config, name)
        ]
        if differ:
            raise FedrirError(
                f"{out} holds a compare with other settings ({'; '.join(differ)}); to continue "
                f"it, pass --config {grid} (and no other settings), or pick another --out"
            )
        return
    make_out_dir(out)
    if not grid.exists() and any(out.iterdir()):
        raise FedrirError(f"{out} is not empty and holds no compare ({GRID}); pick another --out")
    header = (
        "# Settings shared by every run of the fedrir compare in this folder. The grid sets\n"
        "# `algorithm` and `seed` per run (first run: "
        f"algorithms {','.join(algorithms)}, seeds {','.join(map(str, seeds))}).\n"
    )
    atomic_write(grid, header + config_to_toml(config))


class GridProgress:
    """One bar over every round of the grid, showing the run in flight and its latest accuracy."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc="compare",
            unit="round",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.run = ""

    def start(self, algorithm: str, seed: int) -> None:
        self.run = f"{algorithm} seed {seed}"
        self.bar.set_postfix_str(self.run)

    def skip_to(self, position: int) -> None:
        """Move to grid round ``position`` without counting the rounds passed as work done now
        (they ran in an earlier session), so the rate and the time left are this session's."""
        if self.bar.disable:  # a disabled tqdm keeps no counts
            return
        self.bar.initial += position - self.bar.n
        self.bar.n = self.bar.last_print_n = position
        self.bar.refresh()

    def ran(self, position: int, record: RoundRecord | None) -> None:
        """Grid round ``position`` has just run; ``record`` is its evaluation, if it had one.
        Unreported rounds before it were restored from a checkpoint."""
        self.skip_to(position - 1)
        if record is not None:
            self.bar.set_postfix_str(f"{self.run} acc {100 * record.accuracy:.2f}%")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _run_one(config: Config, path: Path, bar: GridProgress, offset: int) -> None:
    """Run, continue, or (when finished before) skip one cell of the grid."""
    bar.start(config.algorithm, config.seed)
    if not (path / api.SUMMARY).exists():
        if (path / api.CONFIG).exists() and config.engine == "flower":
            raise FedrirError(
                f"{path} is an unfinished run on the flower engine, which cannot be resumed; "
                "delete that folder and rerun the compare to redo it"
            )

        def on_round(record: RoundRecord | None, r: int) -> None:
            bar.ran(offset + r, record)

        if (path / api.CONFIG).exists():
            api.resume(path, on_round=on_round)
        else:
            api.run(config, path, on_round=on_round)
    bar.skip_to(offset + config.rounds)


SUMMARY_NUMBERS = (
    "final_accuracy",
    "best_accuracy",
    "client_accuracy_std",
    "bytes_uploaded_per_round",
    "seconds_per_round",
)
"""What the table reads from each run's ``summary.json``, besides parameter counts."""


def _finished(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished run's summary and per-round metrics, or one line on how to redo it."""
    try:
        summary = json.loads((path / api.SUMMARY).read_text())
        metrics = read_metrics(path / api.METRICS)
        _check_numbers(summary, metrics)
    except (OSError, ValueError) as e:
        raise FedrirError(
            f"the finished run in {path} is damaged ({e}); delete that folder and rerun the "
            "compare to redo it"
        ) from None
    return summary, metrics


def _check_numbers(summary: Any, metrics: list[Any]) -> None:
    """ValueError unless a finished run holds everything the table and the curves read."""
    try:
        numbers = [summary[k] for k in SUMMARY_NUMBERS]
        numbers += [summary["parameters"][k] for k in ("shared", "private")]
        numbers += [r[k] for r in metrics for k in ("round", "accuracy", "loss")]
        labelled = isinstance(summary["evaluated_on"], str)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{e} is missing") from None
    if not metrics or not labelled or not all(isinstance(x, int | float) for x in numbers):
        raise ValueError("it has no evaluated round, or a value of the wrong type")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _row(algorithm: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    final_mean, final_std = _mean_std([100 * s["final_accuracy"] for s in summaries])
    best_mean, best_std = _mean_std([100 * s["best_accuracy"] for s in summaries])
    up = statistics.fmean(s["bytes_uploaded_per_round"] for s in summaries)
    return {
        "algorithm": algorithm,
        "final_accuracy_mean": final_mean,
        "final_accuracy_std": final_std,
        "best_accuracy_mean": best_mean,
        "best_accuracy_std": best_std,
        "client_accuracy_std": statistics.fmean(100 * s["client_accuracy_std"] for s in summaries),
        "bytes_uploaded_per_round": up,
        "mb_uploaded_per_round": up / 1e6,
        "seconds_per_round": statistics.fmean(s["seconds_per_round"] for s in summaries),
        "shared_parameters": summaries[0]["parameters"]["shared"],
        "private_parameters": summaries[0]["parameters"]["private"],
        "seeds": len(summaries),
    }


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_mean_std(row: dict[str, Any], name: str) -> str:
    """A table row's ``<name>_mean ± <name>_std`` to two decimals (the mean alone for one seed)."""
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _markdown(
    rows: list[dict[str, Any]], config: Config, seeds: list[int], evaluated_on: str, command: str
) -> str:
    d = config.data
    lines = [
        f"# fedrir compare: {d.dataset}, {d.partition} partition, {d.clients} clients, "
        f"{config.rounds} rounds",
        "",
        f"Command: `{command}`",
        "",
        f"Settings: dataset `{d.dataset}` (fraction {d.fraction}), partition `{d.partition}`, "
        f"alpha {d.alpha}, clients {d.clients}, rounds {config.rounds}, "
        f"seeds {', '.join(map(str, seeds))}; all settings in `{GRID}`, each run's files in "
        f"`{RUNS}/<algorithm>-seed<seed>/`.",
        "",
        f"Accuracy is personalized accuracy on the clients' own {evaluated_on} data (pooled over "
        "clients), in %, as mean ± sample std over seeds. Client spread is the std of per-client "
        "accuracy at the final round, mean over seeds. Upload counts the bytes all clients send "
        "per round (MB = 10^6 bytes). Every method is reported as measured, under the same "
        "settings and partitions. Rows are sorted by final accuracy, highest first.",
        "",
        "| algorithm | final acc (%) | best acc (%) | client spread (%) | upload / round (bytes) "
        "| upload / round (MB) | s / round | shared params | private params | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['algorithm']} | {format_mean_std(r, 'final_accuracy')} "
        f"| {format_mean_std(r, 'best_accuracy')} "
        f"| {r['client_accuracy_std']:.2f} | {r['bytes_uploaded_per_round']:,.0f} "
        f"| {r['mb_uploaded_per_round']:.3f} | {r['seconds_per_round']:.2f} "
        f"| {r['shared_parameters']:,} | {r['private_parameters']:,} | {r['seeds']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def _mean_curve(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
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


def default_command(out: Path, algorithms: list[str], seeds: list[int]) -> str:
    """A command that reproduces the grid from its stored settings."""
    return "fedrir compare " + shlex.join(
        [
            "--config", str(out / GRID),
            "--algorithms", ",".join(algorithms),
            "--seeds", ",".join(map(str, seeds)),
            "--out", str(out),
        ]
    )  # fmt: skip


def compare(
    config: Config,
    algorithms: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    progress: bool = False,
    *,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Run ``algorithms`` × ``seeds`` under ``config`` into ``out`` (continuing a grid already
    there) and write ``results.csv``, ``results.md`` and ``curves.png``. Returns the table's rows
    (keys :data:`COLUMNS`), sorted by final accuracy, highest first."""
    algorithms, seeds, path = check_algorithms(algorithms), check_seeds(seeds), Path(out)
    _claim(path, config, algorithms, seeds)
    # seed-major: after each seed, every algorithm has results on the same partitions
    grid = [(a, s) for s in seeds for a in algorithms]
    bar = GridProgress(len(grid) * config.rounds, progress)
    try:
        for i, (a, s) in enumerate(grid):
            cell = with_overrides(config, {"algorithm": a, "seed": s})
            _run_one(cell, run_dir(path, a, s), bar, i * config.rounds)
    finally:
        bar.close()

    finished = {(a, s): _finished(run_dir(path, a, s)) for a, s in grid}
    summaries = {cell: summary for cell, (summary, _) in finished.items()}
    rows = sorted(
        (_row(a, [summaries[a, s] for s in seeds]) for a in algorithms),
        key=lambda r: -r["final_accuracy_mean"],
    )
    evaluated_on = summaries[grid[0]]["evaluated_on"]
    command = command or default_command(path, algorithms, seeds)
    atomic_write(path / RESULTS_CSV, _csv(rows))
    atomic_write(path / RESULTS_MD, _markdown(rows, config, seeds, evaluated_on, command))
    curves = {a: _mean_curve([finished[a, s][1] for s in seeds]) for a in algorithms}
    d = config.data
    plot_curves(
        curves,
        path / CURVES,
        title=f"{d.dataset}, {d.partition}, {d.clients} clients: mean over seeds "
        f"{', '.join(map(str, seeds))}",
    )
    return rows


# --- command line ---------------------------------------------------------------------------


def _command_line(args: argparse.Namespace) -> str:
    """An invocation equivalent to the one typed, rebuilt from the parsed flags (for the header)."""
    from fedrir.cli import _flag

    parts = ["--algorithms", args.algorithms, "--seeds", args.seeds]
    if args.config:
        parts += ["--config", args.config]
    for name in KEYS:
        if name in PER_RUN or not hasattr(args, name):
            continue
        value = getattr(args, name)
        flag = _flag(name)
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, str(value)]
    return "fedrir compare " + shlex.join([*parts, "--out", args.out])


def cmd_compare(args: argparse.Namespace) -> int:
    from fedrir.cli import build_config

    config, seeds = build_config(args), parse_seeds(args.seeds)
    try:
        compare(
            config,
            args.algorithms.split(","),
            seeds,
            args.out,
            not args.quiet,
            command=_command_line(args),
        )
    except KeyboardInterrupt:
        print(
            "fedrir: interrupted; rerun the same command to continue (finished runs are kept)",
            file=sys.stderr,
        )
        return 130
    out = Path(args.out)
    print((out / RESULTS_MD).read_text(), end="")
    print(f"\nresults in {out}/ ({RESULTS_CSV}, {RESULTS_MD}, {CURVES}, {RUNS}/)")
    return 0


def add_compare_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedrir compare`` (called from ``cli.make_parser``)."""
    from fedrir.cli import _add_config_flags

    p = subparsers.add_parser(
        "compare", help="run several algorithms × seeds on the same settings and tabulate them"
    )
    p.add_argument(
        "--algorithms", required=True, metavar="A,B,…", help="comma-separated algorithm names"
    )
    p.add_argument(
        "--seeds", default="0,1,2", metavar="S,S,…", help="comma-separated seeds (default: 0,1,2)"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="grid folder; rerunning into it continues the grid",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p, [k for name, k in KEYS.items() if name not in PER_RUN])
    p.set_defaults(handler=cmd_compare)
