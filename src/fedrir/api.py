"""The Python API: ``fedrir.run(config)`` and ``fedrir.resume(directory)``.

A run directory holds ``config.toml`` (the resolved configuration), ``metrics.jsonl`` (one line per
evaluated round), ``summary.json``, ``curves.png`` and ``checkpoint/`` (what ``resume`` needs).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrir.algorithms import get_algorithm
from fedrir.algorithms.base import Algorithm, Task, payload_bytes
from fedrir.config import Config, config_to_toml, load_config, run_identity
from fedrir.data.types import FederatedData
from fedrir.engine.runtime import resolve_runtime
from fedrir.errors import DataError, FedrirError
from fedrir.models.cnn import MIN_SIDE
from fedrir.results import (
    RoundRecord,
    append_metrics,
    atomic_write,
    check_out_dir,
    make_out_dir,
    plot_curves,
    summarize,
    write_metrics,
)

if TYPE_CHECKING:
    from fedrir.engine.checkpoint import Snapshot

CONFIG, METRICS, SUMMARY, CURVES, CHECKPOINT = (
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "checkpoint",
)
RESULT_FILES = (CONFIG, METRICS, SUMMARY, CURVES)
"""What a run folder holds besides its checkpoint."""


@dataclass(frozen=True)
class RunResult:
    """What a run returns: its summary, its per-round history, and where its files are."""

    summary: dict[str, Any]
    history: list[RoundRecord]
    out_dir: Path | None


def default_out_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{config.algorithm}-{config.data.dataset}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def prepare(config: Config) -> tuple[Algorithm, FederatedData]:
    """Resolve names, build the clients' data on the device, and the algorithm's workspace."""
    from fedrir.data.federated import build_federated

    algorithm_cls = get_algorithm(config.algorithm)  # fail on a bad name before loading data
    runtime = resolve_runtime(config)
    data = build_federated(config.data, config.seed, batch_size=config.train.batch_size)
    data = dataclasses.replace(data, clients=tuple(c.to(runtime.device) for c in data.clients))
    task = Task(input_shape=data.input_shape, num_classes=data.num_classes)
    _, height, width = task.input_shape
    if min(height, width) < MIN_SIDE:
        raise DataError(
            f"{config.data.dataset}: images of {height}×{width} are too small for the CNN, which "
            f"takes at least {MIN_SIDE}×{MIN_SIDE}; upsample them first"
        )
    return algorithm_cls(config, task, runtime), data


class Progress:
    """A progress bar over rounds showing the latest accuracy and the time per round."""

    def __init__(self, config: Config, start: int, enabled: bool, out: Path | None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=config.rounds,
            initial=start,
            desc=f"{config.algorithm} on {config.data.dataset}",
            unit="round",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.accuracy: float | None = None
        if enabled and out is not None:
            self.bar.write(f"fedrir: writing to {out}/", file=sys.stderr)

    def __call__(self, record: RoundRecord | None, round_: int) -> None:
        if record is not None:
            self.accuracy = record.accuracy
            self.bar.set_postfix(
                acc=f"{100 * record.accuracy:.2f}%", s_per_round=f"{record.seconds:.1f}"
            )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _execute(
    config: Config,
    out: Path | None,
    progress: bool,
    resuming: bool,
    on_round: Callable[[RoundRecord | None, int], None] | None = None,
) -> RunResult:
    from fedrir.engine.checkpoint import Checkpointer, load_snapshot
    from fedrir.engine.simulator import SimState, initial_state, simulate

    wall = time.perf_counter()
    algorithm, data = prepare(config)
    checkpointer = None
    snapshot = None
    if out is not None:
        make_out_dir(out)
        if resuming:
            snapshot = load_snapshot(out / CHECKPOINT, data.num_clients, run_identity(config))
            _check_resumable(out, snapshot, config)
        atomic_write(out / CONFIG, config_to_toml(config))
        if config.checkpoint_every:
            checkpointer = Checkpointer(out / CHECKPOINT, run_identity(config))
    state = (
        SimState.from_snapshot(snapshot)
        if snapshot is not None
        else initial_state(algorithm, config, data.num_clients)
    )
    if out is not None:  # metrics.jsonl holds exactly the rounds the state has seen
        write_metrics(out / METRICS, state.history)
    bar = Progress(config, state.round, progress, out)

    def after_round(record: RoundRecord | None, round_: int) -> None:
        if record is not None and out is not None:
            append_metrics(out / METRICS, record)
        bar(record, round_)
        if on_round is not None:
            on_round(record, round_)

    try:
        state = simulate(
            algorithm, config, data, state, checkpointer=checkpointer, on_round=after_round
        )
    finally:
        bar.close()
    # evaluation sends the global payload to every client, as a deployment does (Flower counts it)
    evaluated = len(state.history) * data.num_clients
    extra = {
        "engine": "sim",
        "bytes_evaluation_downloaded": evaluated * payload_bytes(algorithm.broadcast(state.server)),
    }
    return finish_run(algorithm, state.history, out, wall, extra)


def _check_resumable(out: Path, snapshot: Snapshot | None, config: Config) -> None:
    """Refuse a resume that would throw away rounds already run. A run killed before its first
    checkpoint restarts from round 0 (deterministic: it rewrites the same rounds)."""
    if snapshot is None:
        if (
            config.checkpoint_every == 0
            and (out / METRICS).exists()
            and (out / METRICS).stat().st_size > 0
        ):
            raise FedrirError(
                f"{out} was run with checkpoint_every = 0 and has no checkpoint to resume from; "
                "rerun it into another --out"
            )
        if (out / SUMMARY).exists():  # starting over would overwrite its results
            raise FedrirError(
                f"{out} is a finished run without its checkpoint/, so it cannot be continued; "
                "rerun it with the rounds you want into another --out"
            )
    elif snapshot.round > config.rounds:
        raise FedrirError(
            f"{out} has already run {snapshot.round} rounds; resume with --rounds of at least that"
        )


def finish_run(
    algorithm: Algorithm,
    history: list[RoundRecord],
    out: Path | None,
    wall_start: float,
    extra: dict[str, Any],
) -> RunResult:
    """Summarise a finished run (either engine) and write ``summary.json`` and ``curves.png``."""
    config = algorithm.config
    summary = summarize(
        history,
        {
            "algorithm": config.algorithm,
            "dataset": config.data.dataset,
            "evaluated_on": "validation" if config.data.val_ratio > 0 else "test",
            "clients": config.data.clients,
            "device": str(algorithm.runtime.device),
            "precision": "bf16" if algorithm.runtime.autocast_dtype is not None else "fp32",
            "parameters": algorithm.parameter_counts(),
            "wall_seconds": time.perf_counter() - wall_start,
            **extra,
        },
    )
    if out is not None:
        atomic_write(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
        plot_curves(
            {config.algorithm: [r.to_json() for r in history]},
            out / CURVES,
            title=f"{config.algorithm} on {config.data.dataset}, "
            f"{config.data.clients} clients ({extra['engine']} engine)",
        )
    return RunResult(summary=summary, history=history, out_dir=out)


def run(
    config: Config,
    out: str | Path | None = "auto",
    *,
    progress: bool = False,
    on_round: Callable[[RoundRecord | None, int], None] | None = None,
) -> RunResult:
    """Run ``config`` from scratch. ``out="auto"`` makes a new folder under ``runs/``; ``None``
    writes nothing (and cannot be resumed)."""
    if config.engine == "flower":
        from fedrir.flower.runner import run_flower

        return run_flower(
            config,
            None if out is None else new_out_dir(config, out),
            progress=progress,
            on_round=on_round,
        )
    return _execute(
        config, None if out is None else new_out_dir(config, out), progress, False, on_round
    )


def new_out_dir(config: Config, out: str | Path) -> Path:
    """The folder a new run writes to (``"auto"``: a new one under ``runs/``), refused when it
    is a file, already holds a run or holds anything else: a new run never overwrites files."""
    path = default_out_dir(config) if out == "auto" else Path(out)
    check_out_dir(path)  # fail before loading data, not after
    if (path / CONFIG).exists():
        fix = (
            "delete it"
            if config.engine == "flower"  # Flower runs cannot be resumed
            else f"continue it with --resume {path}"
        )
        raise FedrirError(f"{path} already holds a run; {fix}, or pick another --out")
    if path.is_dir() and any(path.iterdir()):
        raise FedrirError(f"{path} is not empty and holds no run; pick another --out")
    return path


def resume(
    out: str | Path,
    rounds: int | None = None,
    *,
    progress: bool = False,
    on_round: Callable[[RoundRecord | None, int], None] | None = None,
) -> RunResult:
    """Continue the run in ``out`` from its last checkpoint (optionally to more ``rounds``)."""
    path = Path(out)
    if not (path / CONFIG).exists():
        raise FedrirError(f"{path} holds no run to resume (no {CONFIG}); start one with fedrir run")
    config = load_config(path / CONFIG)
    if rounds is not None:
        config = dataclasses.replace(config, rounds=rounds)
    if config.engine == "flower":
        raise FedrirError("runs on the flower engine cannot be resumed here; rerun them")
    return _execute(config, path, progress, True, on_round)
