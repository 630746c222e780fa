"""Crash-safe checkpoints of a run: the server payload, every client's private state, the history.

Tensors go to safetensors files (no pickle on load); one ``manifest.json``, replaced atomically
last, says which files make up the latest complete checkpoint. A crash at any moment leaves either
the previous manifest (and its files, which are deleted only after the new manifest is in place)
or the new one. Only clients whose state changed since the last checkpoint get a new file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedrir.algorithms.base import Payload, State
from fedrir.engine.ledger import COUNTERS
from fedrir.errors import FedrirError
from fedrir.results import RoundRecord, atomic_write

MANIFEST = "manifest.json"


@dataclass
class Snapshot:
    """Everything needed to continue after ``round``."""

    round: int
    server: Payload
    clients: list[State]
    history: list[dict[str, Any]]
    counters: dict[str, Any]


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Writes snapshots into ``directory``, rewriting only what changed."""

    def __init__(self, directory: Path, config_id: str) -> None:
        self.directory = directory
        self.config_id = config_id
        directory.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, str] = {}  # "server" / "client.3" → file name, as in the manifest
        manifest = directory / MANIFEST
        if manifest.exists():
            self.files = dict(_read_manifest(manifest)["files"])

    def save(self, snapshot: Snapshot, dirty_clients: set[int]) -> None:
        r = snapshot.round
        new = {"server": f"server.r{r}.safetensors"}
        _save_tensors(self.directory / new["server"], snapshot.server)
        for cid, state in enumerate(snapshot.clients):
            key = f"client.{cid}"
            if cid in dirty_clients or key not in self.files:
                new[key] = f"client{cid}.r{r}.safetensors"
                _save_tensors(self.directory / new[key], state)
        files = self.files | new
        manifest = {
            "round": r,
            "config": self.config_id,
            "files": files,
            "history": snapshot.history,
            "counters": snapshot.counters,
        }
        atomic_write(self.directory / MANIFEST, json.dumps(manifest))
        self.files = files
        keep = set(files.values()) | {MANIFEST}
        for path in self.directory.iterdir():
            if path.name not in keep and path.suffix in (".safetensors", ".tmp"):
                path.unlink(missing_ok=True)


def _read_manifest(path: Path) -> dict[str, Any]:
    records = {f.name for f in fields(RoundRecord)}
    try:
        data = json.loads(path.read_text())
        if not (
            isinstance(data, dict)
            and isinstance(data.get("round"), int)
            and isinstance(data.get("config"), str)
            and isinstance(data.get("files"), dict)
            and isinstance(data.get("history"), list)
            and all(isinstance(r, dict) and set(r) == records for r in data["history"])
            and isinstance(data.get("counters"), dict)
            and set(data["counters"]) == set(COUNTERS)
        ):
            raise ValueError("not a fedrir checkpoint manifest")
        return data
    except (OSError, ValueError) as e:
        raise FedrirError(
            f"checkpoint manifest {path} is unreadable ({e}); cannot resume"
        ) from None


def load_snapshot(directory: Path, num_clients: int, config_id: str) -> Snapshot | None:
    """The latest complete snapshot in ``directory``, or None when no round was checkpointed;
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
    files = manifest["files"]

    def load(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(directory / files[name]))
        except KeyError:
            raise FedrirError(f"checkpoint in {directory} has no {name}; cannot resume") from None
        except (OSError, SafetensorError) as e:
            raise FedrirError(
                f"checkpoint file for {name} in {directory} is unreadable: {e}"
            ) from None

    return Snapshot(
        round=manifest["round"],
        server=load("server"),
        clients=[load(f"client.{cid}") for cid in range(num_clients)],
        history=manifest["history"],
        counters=manifest["counters"],
    )
