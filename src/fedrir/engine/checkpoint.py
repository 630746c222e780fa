"""Crash-safe checkpoints of a run: the server payload, and a manifest naming the clients' files.

The clients' states live in their store's files (in-process: the
:class:`~fedrir.engine.store.ClientStore` in the same folder; on Flower: each node's own folder): a
checkpoint never copies them, it names their files. Tensors are safetensors files (no pickle on
load); one ``manifest.json``, replaced atomically last, says which files make up the latest
complete checkpoint. A crash at any moment leaves either the previous manifest (and its files,
deleted only after the new manifest is durable) or the new one; files a crash left newer than the
manifest are deleted when the store reopens, so no state from the future is ever used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from fedrir.algorithms.base import Payload
from fedrir.engine.ledger import BEFORE_CODECS, COUNTERS, RECORD_BEFORE_CODECS
from fedrir.engine.store import write_tensors
from fedrir.errors import FedrirError
from fedrir.results import RoundRecord, atomic_write, strict_json

MANIFEST = "manifest.json"
SERVER_PREFIX = "server.r"


@dataclass
class Snapshot:
    """What a checkpoint holds: everything needed to continue after ``round``."""

    round: int
    server: Payload
    clients: dict[int, str]
    """Client → the store's file of its state (clients without one are in their initial state)."""
    history: list[dict[str, Any]]
    counters: dict[str, Any]
    setting: dict[str, Any]
    """What the run ran on (its data's digest, the resolved runtime): a resume must match it
    (empty for checkpoints written before it was recorded)."""
    wall_seconds: float
    """Wall time of every process of the run up to this checkpoint."""


class Checkpointer:
    """Writes checkpoints into ``directory`` of a run under ``config_id`` on ``setting`` (see
    :attr:`Snapshot.setting`) whose wall clock started at ``started`` (``time.perf_counter``,
    moved back by the wall time of the processes before this one)."""

    def __init__(
        self, directory: Path, config_id: str, setting: Mapping[str, Any], started: float
    ) -> None:
        self.directory = directory
        self.config_id = config_id
        self.setting = dict(setting)
        self.started = started
        directory.mkdir(parents=True, exist_ok=True)

    def save(
        self,
        round_: int,
        server: Payload,
        clients: Mapping[int, str],
        history: list[dict[str, Any]],
        counters: dict[str, Any],
    ) -> None:
        """Write the server payload, then the manifest naming it and the clients' files (which
        must be durable already); then delete the server payload it superseded."""
        server_file = f"{SERVER_PREFIX}{round_}.safetensors"
        write_tensors(self.directory / server_file, server, {})
        manifest = {
            "round": round_,
            "config": self.config_id,
            "server": server_file,
            "clients": {str(c): name for c, name in clients.items()},
            "history": history,
            "counters": counters,
            "setting": self.setting,
            "wall_seconds": time.perf_counter() - self.started,
        }
        atomic_write(self.directory / MANIFEST, strict_json(manifest))
        for path in self.directory.iterdir():
            if path.name.startswith(SERVER_PREFIX) and path.name != server_file:
                path.unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    records = {f.name for f in fields(RoundRecord)}
    before = records - RECORD_BEFORE_CODECS
    counters = (set(COUNTERS), set(COUNTERS) - BEFORE_CODECS)
    try:
        data = json.loads(path.read_text())
        if not (
            isinstance(data, dict)
            and isinstance(data.get("round"), int)
            and isinstance(data.get("config"), str)
            and isinstance(data.get("server"), str)
            and isinstance(data.get("clients"), dict)
            and all(k.isdigit() and isinstance(v, str) for k, v in data["clients"].items())
            and isinstance(data.get("history"), list)
            and all(isinstance(r, dict) and set(r) in (records, before) for r in data["history"])
            and isinstance(data.get("counters"), dict)
            and set(data["counters"]) in counters
            and isinstance(data.get("setting", {}), dict)
            and isinstance(data.get("wall_seconds", 0.0), int | float)
        ):
            raise ValueError("not a fedrir checkpoint manifest")
        return data
    except (OSError, ValueError) as e:
        raise FedrirError(
            f"checkpoint manifest {path} is unreadable ({e}); cannot resume"
        ) from None


def checkpoint_files(directory: Path) -> set[str]:
    """The files of the latest complete checkpoint in ``directory`` (its manifest included); every
    file there when the manifest cannot be read (then nothing can be told apart)."""
    try:
        manifest = _read_manifest(directory / MANIFEST)
    except FedrirError:
        if (directory / MANIFEST).exists():
            return {p.name for p in directory.iterdir()}
        return set()
    return {MANIFEST, manifest["server"], *manifest["clients"].values()}


def load_snapshot(directory: Path, config_id: str) -> Snapshot | None:
    """The latest complete checkpoint in ``directory``, or None when no round was checkpointed;
    refused when it was written under another configuration than ``config_id``."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        return None
    manifest = _read_manifest(manifest_path)
    if manifest["config"] != config_id:
        raise FedrirError(
            f"the checkpoint in {directory} was written under other settings than "
            f"{directory.parent / 'config.toml'} now holds (was that file edited?); restore it, or "
            "start a new run"
        )
    try:
        server = load_file(str(directory / manifest["server"]))
    except (OSError, SafetensorError) as e:
        raise FedrirError(
            f"checkpoint file for the server in {directory} is unreadable: {e}"
        ) from None
    return Snapshot(
        round=manifest["round"],
        server=server,
        clients={int(c): name for c, name in manifest["clients"].items()},
        history=manifest["history"],
        counters=manifest["counters"],
        setting=manifest.get("setting", {}),
        wall_seconds=float(manifest.get("wall_seconds", 0.0)),
    )


def check_setting(snapshot: Snapshot, setting: Mapping[str, Any], out: Path) -> None:
    """Refuse to resume the run in ``out`` on other data or another runtime than its checkpoint
    was written on: its numbers would silently continue from something else."""
    changed = [
        "the clients' data changed (were the dataset's files replaced?)"
        if key == "data"
        else f"{key} changed from {snapshot.setting[key]!r} to {setting[key]!r}"
        for key in sorted(setting)
        if key in snapshot.setting and snapshot.setting[key] != setting[key]
    ]
    if changed:
        raise FedrirError(
            f"cannot resume {out}: since its checkpoint, {'; '.join(changed)}; resume it on "
            "the same data and machine settings, or start a new run"
        )
