"""The Python API: ``fedrir.run(config)`` and ``fedrir.resume(directory)``.

A run goes to the engine its config names: the in-process simulator (here) or Flower's simulation
engine (:mod:`fedrir.flower.runner`). What both do around the round loop (building, the run
folder, finishing) is :mod:`fedrir.runs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from fedrir import runs
from fedrir.config import Config, load_config, run_identity
from fedrir.engine.checkpoint import Checkpointer
from fedrir.engine.runtime import torch_threads
from fedrir.engine.simulator import open_state, simulate
from fedrir.errors import FedrirError
from fedrir.flower import runner
from fedrir.progress import Progress
from fedrir.results import RoundRecord
from fedrir.runs import CONFIG_FILE, RunResult

OnRound = Callable[[RoundRecord | None, int], None]
"""Called after every round with its record (None when it was not evaluated) and its number."""


def _execute(
    config: Config, out: Path | None, progress: bool, resuming: bool, on_round: OnRound | None
) -> RunResult:
    wall = time.perf_counter()
    algorithm, data = runs.prepare(config)
    snapshot, checkpointer = None, None
    setting = runs.run_setting(algorithm, [c.digest() for c in data.clients])
    if out is not None and resuming:
        snapshot = runs.resume_point(out, config, setting)
        wall -= 0.0 if snapshot is None else snapshot.wall_seconds
    with runs.states_folder(out, config) as folder:
        state = open_state(algorithm, folder, config.state_cache_mb * 2**20, snapshot)
        if runs.checkpointed(out, config):
            checkpointer = Checkpointer(folder, run_identity(config), setting, wall)
        if out is not None:
            runs.start_files(out, config, state.ledger.history)
        bar = Progress(config, state.round, progress, out)

        def after_round(record: RoundRecord | None, round_: int) -> None:
            if record is not None and out is not None:
                runs.record_round(out, record)
            bar(record, round_)
            if on_round is not None:
                on_round(record, round_)

        try:
            state = simulate(
                algorithm, config, data, state, checkpointer=checkpointer, on_round=after_round
            )
        finally:
            bar.close()
    return runs.finish_run(algorithm, state.ledger, out, wall, "sim")


def run(
    config: Config,
    out: str | Path | None = "auto",
    *,
    progress: bool = False,
    on_round: OnRound | None = None,
    quiet: bool = False,
) -> RunResult:
    """Run ``config`` from scratch. ``out="auto"`` makes a new folder under ``runs/``; ``None``
    writes nothing (and cannot be resumed). ``quiet``: on Flower, its warnings and errors only."""
    path = None if out is None else runs.new_out_dir(config, out)
    with contextlib.ExitStack() as held, torch_threads(config):
        if path is not None:
            held.enter_context(runs.writing(path, new=True))
        if config.engine == "flower":
            return runner.run_flower(
                config, path, progress=progress, on_round=on_round, quiet=quiet
            )
        return _execute(config, path, progress, False, on_round)


def resume(
    out: str | Path,
    rounds: int | None = None,
    *,
    progress: bool = False,
    on_round: OnRound | None = None,
    quiet: bool = False,
) -> RunResult:
    """Continue the run in ``out`` from its last checkpoint (optionally to more ``rounds``);
    ``quiet`` as for :func:`run`."""
    path = Path(out)
    if not (path / CONFIG_FILE).exists():
        raise FedrirError(
            f"{path} holds no run to resume (no {CONFIG_FILE}); start one with fedrir run"
        )
    config = load_config(path / CONFIG_FILE)
    if rounds is not None:
        config = dataclasses.replace(config, rounds=rounds)
    with runs.writing(path, new=False), torch_threads(config):
        if config.engine == "flower":
            return runner.run_flower(config, path, progress, on_round, resume=True, quiet=quiet)
        return _execute(config, path, progress, True, on_round)
