"""``fedrir run --engine flower``: the run on Flower's simulation engine, inside this process.

``flwr.simulation.run_simulation`` starts the ServerApp in a thread and one virtual SuperNode per
client on a Ray backend (2 CPUs, 1 per ClientApp, so two clients train at a time). The config
reaches both apps directly (they are built around it), not through a FAB; ``flwr run .`` and
deployments load the same apps with the config as run config instead. The result files are the
in-process engine's, written by the ServerApp.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from logging import WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import console_handler
from flwr.serverapp import Grid, ServerApp

from fedrir import runs
from fedrir.config import Config
from fedrir.engine.runtime import available_cpus, thread_count
from fedrir.errors import FedrirError
from fedrir.flower.app import APP_SETTINGS, PromptGrid, make_client_app, serve
from fedrir.progress import Progress
from fedrir.results import RoundRecord
from fedrir.runs import RunResult

RAY_CPUS = available_cpus()
"""CPUs Ray may use in all; each ClientApp takes as many as it runs threads (so with the default,
every CPU: one client at a time, computing exactly what the in-process engine computes)."""

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""Flower and Ray without phoning home: runs must work offline."""


@contextlib.contextmanager
def offline_flower() -> Iterator[None]:
    """Offline settings and a private ``FLWR_HOME`` for the duration of a run, then restored."""
    with tempfile.TemporaryDirectory(prefix="fedrir-flwr-") as home:
        changes = OFFLINE_ENV | {"FLWR_HOME": os.environ.get("FLWR_HOME", home)}
        saved = {k: os.environ.get(k) for k in changes}
        os.environ.update(changes)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextlib.contextmanager
def flower_logs(quiet: bool) -> Iterator[None]:
    """Flower's console log at INFO as usual, or, when ``quiet``, its warnings and errors only
    (for the duration of a run, then restored)."""
    level = console_handler.level
    if quiet:
        console_handler.setLevel(WARNING)
    try:
        yield
    finally:
        console_handler.setLevel(level)


def run_flower(
    config: Config,
    out: Path | None,
    progress: bool = False,
    on_round: Callable[[RoundRecord | None, int], None] | None = None,
    *,
    resume: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Run ``config`` on Flower's simulation engine with one SuperNode per client (or continue
    the run in ``out`` from its checkpoint); ``on_round(record, round)`` after each round, as
    ``fedrir.run`` has it. The clients keep their states in the run's checkpoint folder (a
    temporary one when nothing is checkpointed). ``quiet``: Flower and Ray log warnings and
    errors only."""
    import ray  # here, not at the top: importing Ray takes seconds that other commands don't need
    from flwr.simulation import run_simulation

    # bad names, missing data, impossible partitions: one line, before Ray starts
    runs.prepare(config)
    snapshot = runs.resume_point(out, config) if resume and out is not None else None
    results: list[RunResult] = []
    errors: list[FedrirError | OSError] = []
    bar = Progress(config, 0 if snapshot is None else snapshot.round, progress, out)
    server = ServerApp()

    def after_round(record: RoundRecord | None, round_: int) -> None:
        bar(record, round_)
        if on_round is not None:
            on_round(record, round_)

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        timeout = float(APP_SETTINGS["timeout"])
        try:
            results.append(
                serve(PromptGrid(grid), config, out, timeout, on_round=after_round, resume=resume)
            )
        except (FedrirError, OSError) as e:  # raised again below, in the caller's thread
            errors.append(e)

    try:
        with offline_flower(), flower_logs(quiet), runs.states_folder(out, config) as states:
            run_simulation(
                server_app=server,
                client_app=make_client_app(lambda _: config, states),
                num_supernodes=config.data.clients,
                backend_config={
                    "client_resources": {
                        "num_cpus": min(thread_count(config), RAY_CPUS),
                        "num_gpus": 0.0,
                    },
                    "init_args": {
                        "num_cpus": RAY_CPUS,
                        "num_gpus": 0,
                        "logging_level": "ERROR" if quiet else "WARNING",
                        "log_to_driver": not quiet,
                    },
                },
            )
    finally:
        bar.close()
        if ray.is_initialized():  # Flower shuts Ray down itself, unless something failed first
            ray.shutdown()
    if errors:
        raise errors[0]
    if not results:
        raise FedrirError("the Flower simulation ended without a result; see its log above")
    return results[0]
