"""What every run does around its round loop, on either engine: resolve and build
(:func:`prepare`), claim and fill its folder, and finish it (summary and curves).

The in-process engine (through :mod:`fedrir.api`) and the Flower ServerApp both start, record and
finish runs through this module, so a run folder looks the same whichever engine wrote it:
``config.toml`` (the resolved configuration), ``metrics.jsonl`` (one line per evaluated round),
``summary.json``, ``curves.png``, and ``checkpoint/`` (what a resume needs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedrir.algorithms import get_algorithm
from fedrir.algorithms.base import Algorithm, Runtime, Task
from fedrir.config import Config, config_to_toml, run_identity
from fedrir.data.federated import build_federated
from fedrir.data.types import FederatedData
from fedrir.engine import rounds
from fedrir.engine.checkpoint import Snapshot, check_setting, checkpoint_files, load_snapshot
from fedrir.engine.ledger import Ledger, ratio
from fedrir.engine.runtime import resolve_runtime, thread_count
from fedrir.errors import DataError, FedrirError
from fedrir.lock import contents, folder_lock
from fedrir.models.cnn import MIN_SIDE
from fedrir.results import (
    RoundRecord,
    append_metrics,
    atomic_write,
    plot_curves,
    strict_json,
    summarize,
    write_metrics,
)

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE = (
    "config.toml",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
)
CHECKPOINT_DIR = "checkpoint"
RESULT_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE)
"""What a run folder holds besides its checkpoint."""


@dataclass(frozen=True)
class RunResult:
    """What a run returns: its summary, its per-round history, and where its files are."""

    summary: dict[str, Any]
    history: list[RoundRecord]
    out_dir: Path | None


def prepare(config: Config) -> tuple[Algorithm, FederatedData]:
    """Resolve names, build the clients' data on the device, and the algorithm's workspace."""
    algorithm_cls = get_algorithm(config.algorithm)  # fail on a bad name before loading data
    runtime = resolve_runtime(config)
    data = build_federated(config.data, config.seed, batch_size=config.train.batch_size)
    data = dataclasses.replace(data, clients=tuple(c.to(runtime.device) for c in data.clients))
    rounds.check_someone_trains(config, data.num_clients)
    task = Task(input_shape=data.input_shape, num_classes=data.num_classes)
    _, height, width = task.input_shape
    if min(height, width) < MIN_SIDE:
        raise DataError(
            f"{config.data.dataset}: images of {height}×{width} are too small for the CNN, which "
            f"takes at least {MIN_SIDE}×{MIN_SIDE}; upsample them first"
        )
    return algorithm_cls(config, task, runtime), data


# --- the run folder ---------------------------------------------------------------------------


def default_out_dir(config: Config) -> Path:
    """A new folder under ``runs/`` named after the time and the run, created here: the name is
    claimed atomically (``mkdir``), so two runs started together never share a folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{config.algorithm}-{config.data.dataset}"
    make_out_dir(base.parent)
    out, n = base, 1
    while True:
        try:
            out.mkdir()
            return out
        except FileExistsError:
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        except OSError as e:
            raise FedrirError(f"cannot create {out} ({e.strerror}); pass --out") from None


def check_out_dir(path: Path) -> None:
    """Stop early when the result folder ``path`` is an existing file."""
    if path.exists() and not path.is_dir():
        raise FedrirError(f"{path} is a file, not a folder; pick another --out")


def make_out_dir(path: Path) -> None:
    """Create the result folder ``path`` (and its parents), or say in one line why it cannot be."""
    check_out_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FedrirError(f"cannot create {path} ({e.strerror}); pick another --out") from None


def check_new(path: Path) -> None:
    """Refuse ``path`` for a new run when it is a file, already holds a run or holds anything
    else: a new run never overwrites files."""
    check_out_dir(path)
    if (path / CONFIG_FILE).exists():
        raise FedrirError(
            f"{path} already holds a run; continue it with --resume {path}, or pick another --out"
        )
    if path.is_dir() and contents(path):
        raise FedrirError(f"{path} is not empty and holds no run; pick another --out")


def new_out_dir(config: Config, out: str | Path) -> Path:
    """The folder a new run writes to (``"auto"``: a new one under ``runs/``, claimed now); the
    run checks it (:func:`check_new`) under its lock (:func:`writing`), before loading data."""
    if str(out) == "":
        raise FedrirError("--out is empty; name a folder, or leave --out out for one under runs/")
    path = default_out_dir(config) if out == "auto" else Path(out)
    check_out_dir(path)
    return path


@contextlib.contextmanager
def writing(path: Path, *, new: bool) -> Iterator[None]:
    """Hold ``path`` as its only writer for a whole run, resume or grid (created if needed; a
    new run's folder checked again under the lock). A new run that fails before writing anything
    leaves no folder behind; a full disk is one line, and the failed round's files are removed."""
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    make_out_dir(path)
    try:
        with folder_lock(path):
            if new:
                check_new(path)
            try:
                yield
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                discard_partial(path)
                raise FedrirError(
                    f"the disk holding {path} is full; the failed round's files were removed; "
                    f"free some space, then fedrir run --resume {path}"
                ) from None
    except BaseException:
        if new:  # the folder, and the parents made for it, if they are still empty
            for folder in dict.fromkeys([path, *created]):
                with contextlib.suppress(OSError):  # not empty, or another writer's by now
                    folder.rmdir()
        raise


def discard_partial(out: Path) -> None:
    """Remove what an interrupted round left in ``out``: half-written files, and checkpoint files
    that its manifest does not name (the last complete checkpoint stays whole)."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    folder = out / CHECKPOINT_DIR
    if folder.is_dir():
        named = checkpoint_files(folder)
        for path in folder.iterdir():
            if path.name not in named:
                path.unlink(missing_ok=True)


def checkpointed(out: Path | None, config: Config) -> bool:
    """Whether the run keeps a checkpoint (a folder to write it in, and a period)."""
    return out is not None and config.checkpoint_every > 0


@contextlib.contextmanager
def states_folder(out: Path | None, config: Config) -> Iterator[Path]:
    """Where the clients' states live during a run: the run's checkpoint folder, since the store
    is the checkpoint; a scratch folder, removed after, for a run that keeps no checkpoint."""
    if out is not None and checkpointed(out, config):
        yield out / CHECKPOINT_DIR
    else:
        with tempfile.TemporaryDirectory(prefix="fedrir-states-") as scratch:
            yield Path(scratch)


def start_files(out: Path, config: Config, history: list[RoundRecord]) -> None:
    """The run's ``config.toml``, and ``metrics.jsonl`` holding exactly the rounds in ``history``
    (those a resumed state has seen; none for a new run)."""
    make_out_dir(out)
    atomic_write(out / CONFIG_FILE, config_to_toml(config))
    write_metrics(out / METRICS_FILE, history)


def run_setting(algorithm: Algorithm, client_digests: Sequence[str]) -> dict[str, Any]:
    """What a run runs on besides its config, recorded in its checkpoints and checked on resume:
    a digest of its clients' data (each client's :meth:`~fedrir.data.types.ClientData.digest`,
    in order) and the runtime ``auto`` settings resolved to."""
    data = hashlib.blake2b("".join(client_digests).encode(), digest_size=16).hexdigest()
    return {
        "data": data,
        "device": str(algorithm.runtime.device),
        "precision": precision_name(algorithm.runtime),
        "threads": thread_count(algorithm.config),
    }


def precision_name(runtime: Runtime) -> str:
    return "bf16" if runtime.autocast_dtype is not None else "fp32"


def resume_point(
    out: Path, config: Config, setting: Mapping[str, Any] | None = None
) -> Snapshot | None:
    """The checkpoint a resume of the run in ``out`` continues from (None: start over, which is
    deterministic), or one line on why it cannot be resumed (``setting``: see :func:`run_setting`,
    when already known)."""
    snapshot = load_snapshot(out / CHECKPOINT_DIR, run_identity(config))
    if snapshot is not None and setting is not None:
        check_setting(snapshot, setting, out)
    if snapshot is None:
        metrics = out / METRICS_FILE
        if config.checkpoint_every == 0 and metrics.exists() and metrics.stat().st_size > 0:
            raise FedrirError(
                f"{out} was run with checkpoint_every = 0 and has no checkpoint to resume from; "
                "rerun it into another --out"
            )
        if (out / SUMMARY_FILE).exists():  # starting over would overwrite its results
            raise FedrirError(
                f"{out} is a finished run without its checkpoint/, so it cannot be continued; "
                "rerun it with the rounds you want into another --out"
            )
    elif snapshot.round > config.rounds:
        raise FedrirError(
            f"{out} has already run {snapshot.round} rounds; resume with --rounds of at least that"
        )
    return snapshot


def record_round(out: Path, record: RoundRecord) -> None:
    append_metrics(out / METRICS_FILE, record)


def finish_run(
    algorithm: Algorithm, ledger: Ledger, out: Path | None, wall_start: float, engine: str
) -> RunResult:
    """Summarise a finished run (either engine) and write ``summary.json`` and ``curves.png``."""
    config = algorithm.config
    summary = summarize(
        ledger.history,
        config.data.clients - config.new_clients,  # the new clients never train nor count here
        {
            "algorithm": config.algorithm,
            "dataset": config.data.dataset,
            "evaluated_on": "validation" if config.data.val_ratio > 0 else "test",
            "clients": config.data.clients,
            "device": str(algorithm.runtime.device),
            "precision": precision_name(algorithm.runtime),
            "parameters": algorithm.parameter_counts(),
            "wall_seconds": time.perf_counter() - wall_start,
            "engine": engine,
            "bytes_evaluation_downloaded": ledger.bytes_evaluation_downloaded,
            "message_bytes_uploaded": ledger.message_bytes_up,
            "message_bytes_downloaded": ledger.message_bytes_down,
            "uplink": config.uplink,
            "downlink": config.downlink,
            "raw_bytes_uploaded": ledger.raw_bytes_up,
            "raw_bytes_downloaded": ledger.raw_bytes_down,
            "compression_up": ratio(ledger.raw_bytes_up, ledger.bytes_up),
            "compression_down": ratio(ledger.raw_bytes_down, ledger.bytes_down),
            "codec_seconds": ledger.codec_seconds,
            "codec_share": ledger.codec_seconds / ledger.seconds if ledger.seconds else 0.0,
        },
    )
    if out is not None:
        atomic_write(out / SUMMARY_FILE, strict_json(summary, indent=2) + "\n")
        plot_curves(
            {config.algorithm: [r.to_json() for r in ledger.history]},
            out / CURVES_FILE,
            title=f"{config.algorithm} on {config.data.dataset}, "
            f"{config.data.clients} clients ({engine} engine)",
        )
    return RunResult(summary=summary, history=ledger.history, out_dir=out)
