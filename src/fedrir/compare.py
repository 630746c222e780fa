"""``fedrir compare``: every algorithm × uplink codec × seed on the same settings, then one table
and one plot.

The partition depends only on the data settings and the seed, so runs that share a seed train and
test every algorithm on the same clients' data. Each run is an ordinary run folder,
``DIR/runs/<algorithm>-seed<seed>/`` (``<algorithm>-<codec>-seed<seed>/`` when the grid compares
codecs, e.g. ``fedavg-topk0.01+int8-seed0``), resumable on its own. ``DIR/compare.toml``
records the grid's settings, so that rerunning the command continues the grid (finished runs are
kept, unfinished ones resumed) and never mixes results obtained under different settings. A run
that diverges (stops at a non-finite number) is recorded as such in its folder
(``diverged.json``), is not retried when the grid continues (it would diverge again: runs are
deterministic), and is named, not reported, under the table; the grid goes on.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from fedrir import api, tables
from fedrir.algorithms import get_algorithm
from fedrir.config import (
    ALGORITHM_KEYS,
    KEYS,
    Config,
    config_to_toml,
    flat_value,
    load_config,
    with_overrides,
)
from fedrir.engine.codecs import parse_codec
from fedrir.errors import ConfigError, Diverged, FedrirError
from fedrir.lock import contents
from fedrir.progress import GridProgress
from fedrir.results import RoundRecord, atomic_write, plot_curves, read_metrics
from fedrir.runs import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, make_out_dir, writing

GRID, RUNS, RESULTS_CSV, RESULTS_MD, CURVES, DIVERGED = (
    "compare.toml",
    "runs",
    "results.csv",
    "results.md",
    "curves.png",
    "diverged.json",
)
PER_RUN = ("algorithm", "seed", "uplink")
"""Keys the grid sets per run; every other key is shared by all runs of a compare."""


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


def check_codecs(codecs: Sequence[str]) -> list[str]:
    """Every uplink codec parsed before anything runs (one line listing the valid forms)."""
    specs = [c.strip() for c in codecs]
    if len(set(specs)) != len(specs):
        raise ConfigError(f"codecs must be distinct; got {', '.join(specs)}")
    for spec in specs:
        parse_codec(spec)
    return specs


def cell_name(algorithm: str, codec: str | None) -> str:
    """A grid cell's name: the algorithm, and its uplink codec when the grid compares codecs."""
    return algorithm if codec is None else f"{algorithm}-{codec.replace(':', '')}"


def run_dir(out: Path, algorithm: str, seed: int, codec: str | None = None) -> Path:
    return out / RUNS / f"{cell_name(algorithm, codec)}-seed{seed}"


def _claim(
    out: Path, config: Config, algorithms: list[str], seeds: list[int], codecs: list[str]
) -> None:
    """Make ``out`` this grid's folder, or check that it already is one with the same settings.
    A grid whose first run never started (a typo, data not there) takes the new settings."""
    grid = out / GRID
    started = any((out / RUNS).glob(f"*/{CONFIG_FILE}"))
    if grid.exists() and started:
        differ = _differences(load_config(grid), config, skip=PER_RUN)
        if differ:
            raise FedrirError(
                f"{out} holds a compare with other settings ({'; '.join(differ)}); to continue "
                f"it, pass --config {grid} (and no other settings), or pick another --out"
            )
        return
    make_out_dir(out)
    if not grid.exists() and contents(out):
        raise FedrirError(f"{out} is not empty and holds no compare ({GRID}); pick another --out")
    header = (
        "# Settings shared by every run of the fedrir compare in this folder. The grid sets\n"
        "# `algorithm`, `seed` and `uplink` per run (first run: "
        f"algorithms {','.join(algorithms)}, codecs {','.join(codecs)}, "
        f"seeds {','.join(map(str, seeds))}).\n"
    )
    atomic_write(grid, header + config_to_toml(config))


def _differences(stored: Config, config: Config, skip: Collection[str] = ()) -> list[str]:
    return [
        f"{name}: {flat_value(stored, name)!r} there, {flat_value(config, name)!r} here"
        for name in KEYS
        if name not in skip and flat_value(stored, name) != flat_value(config, name)
    ]


def _check_cell(path: Path, cell: Config) -> None:
    """Refuse a grid one of whose runs was started (or extended) under other settings; other
    algorithms' own settings (e.g. a default changed since the run) cannot change it."""
    if (path / CONFIG_FILE).exists():
        unread = ALGORITHM_KEYS - get_algorithm(cell.algorithm).settings
        differ = _differences(load_config(path / CONFIG_FILE), cell, skip=unread)
        if differ:
            raise FedrirError(
                f"the run in {path} differs from the grid ({'; '.join(differ)}; was it extended "
                "or edited?); delete that folder to redo it, or pick another --out"
            )


def _run_one(config: Config, path: Path, bar: GridProgress, offset: int) -> None:
    """Run, continue, or (when finished or diverged before) skip one cell of the grid; a run that
    diverges is recorded in its folder."""
    bar.start(path.name.rpartition("-seed")[0], config.seed)
    if not (path / SUMMARY_FILE).exists() and _diverged_in(path) is None:

        def on_round(record: RoundRecord | None, r: int) -> None:
            bar.ran(offset + r, record)

        try:
            if (path / CONFIG_FILE).exists():
                api.resume(path, on_round=on_round)
            else:
                api.run(config, path, on_round=on_round)
        except Diverged as e:
            atomic_write(path / DIVERGED, json.dumps({"round": e.round, "error": str(e)}) + "\n")
            bar.note(f"{e}: recorded in {path / DIVERGED}; the grid goes on")
    bar.skip_to(offset + config.rounds)


def _diverged_in(path: Path) -> int | None:
    """The round in which the run in ``path`` diverged, or None if it has not."""
    try:
        record = json.loads((path / DIVERGED).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise FedrirError(
            f"{path / DIVERGED} is damaged ({e}); delete it to redo that run"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("round"), int):
        raise FedrirError(f"{path / DIVERGED} names no round; delete it to redo that run")
    return record["round"]


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
        summary = json.loads((path / SUMMARY_FILE).read_text())
        metrics = read_metrics(path / METRICS_FILE)
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


def default_command(out: Path, algorithms: list[str], seeds: list[int], codecs: list[str]) -> str:
    """A command that reproduces the grid from its stored settings."""
    return "fedrir compare " + shlex.join(
        [
            "--config", str(out / GRID),
            "--algorithms", ",".join(algorithms),
            "--codecs", ",".join(codecs),
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
    codecs: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``algorithms`` × ``codecs`` (uplink codecs; default: the config's ``uplink`` alone) ×
    ``seeds`` under ``config`` into ``out`` (continuing a grid already there) and write
    ``results.csv``, ``results.md`` and ``curves.png``. Returns the table's rows (keys
    :data:`fedrir.tables.COLUMNS`), ranked by :func:`fedrir.tables.rank`."""
    algorithms, seeds, path = check_algorithms(algorithms), check_seeds(seeds), Path(out)
    codecs = check_codecs([config.uplink] if codecs is None else codecs)
    if str(out) == "":
        raise ConfigError("--out is empty; name the grid's folder")
    with writing(path, new=False):
        return _compare(config, algorithms, seeds, codecs, path, progress, command)


def _compare(
    config: Config,
    algorithms: list[str],
    seeds: list[int],
    codecs: list[str],
    path: Path,
    progress: bool,
    command: str | None,
) -> list[dict[str, Any]]:
    labelled = codecs != ["none"]  # cells' names say their codec unless the grid has none

    def where(a: str, c: str, s: int) -> Path:
        return run_dir(path, a, s, c if labelled else None)

    _claim(path, config, algorithms, seeds, codecs)
    # seed-major: after each seed, every cell has results on the same partitions
    pairs = [(a, c) for a in algorithms for c in codecs]
    grid = [(a, c, s) for s in seeds for a, c in pairs]
    cells = {
        (a, c, s): with_overrides(config, {"algorithm": a, "seed": s, "uplink": c})
        for a, c, s in grid
    }
    for (a, c, s), cell in cells.items():
        _check_cell(where(a, c, s), cell)
    bar = GridProgress(len(grid) * config.rounds, progress)
    try:
        for i, (a, c, s) in enumerate(grid):
            _run_one(cells[a, c, s], where(a, c, s), bar, i * config.rounds)
    finally:
        bar.close()

    stops = {cell: _diverged_in(where(*cell)) for cell in grid}
    finished = {cell: _finished(where(*cell)) for cell in grid if stops[cell] is None}

    def name(a: str, c: str) -> str:
        return f"{a} {c}" if labelled else a

    ran = {(a, c): [finished[a, c, s] for s in seeds if (a, c, s) in finished] for a, c in pairs}
    diverged = {
        name(a, c): [(s, r) for s in seeds if (r := stops[a, c, s]) is not None] for a, c in pairs
    }
    rows = tables.rank(
        [
            tables.algorithm_row(a, c, [summary for summary, _ in runs], len(diverged[name(a, c)]))
            for (a, c), runs in ran.items()
            if runs
        ]
    )
    if not rows:
        raise FedrirError(f"every run of the grid in {path} diverged; try a lower --lr")
    evaluated_on = next(iter(finished.values()))[0]["evaluated_on"]
    command = command or default_command(path, algorithms, seeds, codecs)
    atomic_write(path / RESULTS_CSV, tables.to_csv(rows))
    markdown = tables.to_markdown(
        rows,
        config,
        seeds,
        evaluated_on,
        command,
        (GRID, RUNS),
        {label: runs for label, runs in diverged.items() if runs},
    )
    atomic_write(path / RESULTS_MD, markdown)
    curves = {
        name(a, c): tables.mean_curve([metrics for _, metrics in runs])
        for (a, c), runs in ran.items()
        if runs
    }
    d = config.data
    plot_curves(
        curves,
        path / CURVES,
        title=f"{d.dataset}, {d.partition}, {d.clients} clients: mean over seeds "
        f"{', '.join(map(str, seeds))}",
    )
    return rows
