"""Clients' private states on disk behind a byte-bounded LRU cache: the store *is* the checkpoint.

A run with many clients cannot keep every client's ``State`` in RAM (FedRIR's is ~30 MB), so a
state is loaded only when a round touches the client and written back when it changed. States are
safetensors files (no pickle) in the run folder; a checkpoint's manifest names them rather than
copying them. File names carry a store-wide sequence number (``client17.s000042.safetensors``), so
a newer version never overwrites a file that a durable manifest names.

Protocol: ``flush()`` → write the manifest naming the returned files, durably → ``commit(files)``.
A crash anywhere in between leaves the previous manifest and its files intact; reopening with the
previous manifest's map deletes every newer file, so no state from the future is used.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from fedrir.algorithms.base import State
from fedrir.errors import ConfigError, FedrirError

_NAME = r"client(\d+)\.s(\d+)\.safetensors"
_FILE = re.compile(_NAME)
_OURS = re.compile(rf"{_NAME}|\.{_NAME}\.tmp")
"""A store file, or the temporary name it is written under (left behind by a kill)."""
_DAMAGED = "the checkpoint is damaged; restore it or start a new run"


@dataclass
class StoreStats:
    """Running totals, so a benchmark can report the store's share of a round."""

    bytes_read: int = 0
    bytes_written: int = 0
    files_written: int = 0
    spills: int = 0  # dirty states written because the cache was full
    seconds: float = 0.0  # in file reads and writes
    hits: int = 0
    misses: int = 0


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


K = TypeVar("K", int, str)

_TRIM_EVERY = 256 * 2**20
"""Bytes of states dropped from a cache between two hand-backs of free memory to the system."""
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only; None elsewhere


def release_free_memory() -> None:
    """Give the allocator's free memory back to the system (glibc's ``malloc_trim``; nothing where
    there is none). States streaming through a cache leave freed blocks scattered over the heap,
    which glibc otherwise keeps: 1 GB of a 3.4 GB peak with 1 000 FedRIR clients on MNIST."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class StateCache(Generic[K]):
    """States by key, least recently used first, holding at most ``budget`` bytes; each state
    pushed out goes to ``evicted`` (possibly the one just put: its caller still holds it). Every
    ``_TRIM_EVERY`` bytes pushed out, the freed memory goes back to the system."""

    def __init__(self, budget: int, evicted: Callable[[K, State], None]) -> None:
        if budget < 0:
            raise ConfigError(f"state cache budget is {budget} bytes; set it to 0 or more")
        self.budget = budget
        self.evicted: Callable[[K, State], None] = evicted
        self._states: OrderedDict[K, State] = OrderedDict()
        self._bytes = 0
        self._dropped = 0  # bytes pushed out since memory was last given back

    def get(self, key: K) -> State | None:
        if key not in self._states:
            return None
        self._states.move_to_end(key)
        return self._states[key]

    def put(self, key: K, state: State) -> None:
        if key in self._states:
            self._bytes -= state_bytes(self._states.pop(key))
        self._states[key] = state
        self._bytes += state_bytes(state)
        while self._bytes > self.budget:
            victim, dropped = self._states.popitem(last=False)
            self._bytes -= state_bytes(dropped)
            self._dropped += state_bytes(dropped)
            self.evicted(victim, dropped)
        if self._dropped >= _TRIM_EVERY:
            self._dropped = 0
            release_free_memory()


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, str]) -> None:
    """``tensors`` to ``path`` as safetensors (with metadata ``meta``), whole or not at all: a
    temporary file, fsynced, then renamed; removed if writing fails (a full disk is an OSError)."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_state(path: Path, state: State, client: int) -> None:
    """``client``'s ``state`` to ``path``; the file names its client and its own name, so a file
    swapped for another is told."""
    write_tensors(path, state, {OWNER: str(client), NAME: path.name})


OWNER, NAME = "fedrir-client", "fedrir-file"
"""Metadata keys of a state file: its client, and the name it was written under."""


def check_owner(path: Path, client: int) -> None:
    """Raise ValueError unless ``path`` is a whole state file written for ``client`` under its
    name (files written before the name was recorded pass on their header alone); OSError and
    SafetensorError when it is missing or not safetensors."""
    with safe_open(str(path), framework="pt") as f:  # reads and checks the header and size
        meta = f.metadata() or {}
    if OWNER in meta and (meta[OWNER], meta.get(NAME)) != (str(client), path.name):
        raise ValueError(
            f"it holds client {meta[OWNER]}'s state written as {meta.get(NAME)}, swapped in"
        )


def sync_directory(directory: Path) -> None:
    """Make the names of files just renamed into ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ClientStore:
    """Every client's latest state: cached (LRU, at most ``budget_bytes``) or in its newest file,
    or, for a client that never had one, ``initial(client)`` (deterministic, so never written).

    ``get`` returns the cached tensors themselves: treat them as read-only and ``put`` a new state.
    """

    def __init__(
        self,
        directory: Path,
        budget_bytes: int,
        initial: Callable[[int], State],
        device: torch.device,
        committed: Mapping[int, str] | None = None,
    ) -> None:
        """``committed`` is the client → file map of the last durable manifest (None for a new run).
        Any store file in ``directory`` that it does not name is from an interrupted round: deleted.
        """
        self.directory = directory
        self.initial = initial
        self.device = device
        self.stats = StoreStats()
        self._cache: StateCache[int] = StateCache(budget_bytes, self._evicted)
        self._dirty: set[int] = set()
        self._latest: dict[int, str] = dict(committed or {})  # client → newest file
        self._pinned = set(self._latest.values())  # named by a durable or pending manifest
        self._stale: set[str] = set()  # pinned files that a newer version superseded
        self._unsynced = False  # files renamed into place since the directory was last fsynced
        seqs = [self._check(c, name) for c, name in self._latest.items()]
        self._seq = max(seqs, default=-1) + 1
        directory.mkdir(parents=True, exist_ok=True)
        for path in directory.iterdir():
            if _OURS.fullmatch(path.name) and path.name not in self._pinned:
                path.unlink()

    def get(self, client: int) -> State:
        """The client's latest state, on ``device``."""
        state = self._cache.get(client)
        if state is not None:
            self.stats.hits += 1
            return state
        self.stats.misses += 1
        name = self._latest.get(client)
        state = self.initial(client) if name is None else self._read(client, name)
        self._cache.put(client, state)
        return state

    def put(self, client: int, state: State) -> None:
        """The client's new state; written at the next ``flush``, or earlier if evicted."""
        self._dirty.add(client)
        self._cache.put(client, state)

    def flush(self) -> dict[int, str]:
        """Write every changed state; the complete client → file map for the next manifest."""
        for client in sorted(self._dirty):
            state = self._cache.get(client)
            assert state is not None, "a dirty state is cached until written"
            self._write(client, state)
        self._dirty.clear()
        if self._unsynced:  # spills included: every name is durable before a manifest names it
            self._sync_directory()
        files = dict(sorted(self._latest.items()))
        self._pinned |= set(files.values())
        return files

    def commit(self, files: Mapping[int, str]) -> None:
        """Called once the manifest naming ``files`` is durable: delete what it superseded."""
        keep = set(files.values())
        for name in self._stale - keep:
            (self.directory / name).unlink(missing_ok=True)
        self._stale &= keep
        self._pinned = keep

    def _evicted(self, client: int, state: State) -> None:
        """A state pushed out of the cache: written first if it changed (a spill)."""
        if client in self._dirty:
            self._write(client, state)
            self._dirty.discard(client)
            self.stats.spills += 1

    def _write(self, client: int, state: State) -> None:
        start = time.perf_counter()
        name = f"client{client}.s{self._seq:06d}.safetensors"
        self._seq += 1
        path = self.directory / name
        write_state(path, state, client)
        self._unsynced = True
        previous = self._latest.get(client)
        self._latest[client] = name
        if previous in self._pinned:
            self._stale.add(previous)  # a manifest may still name it: deleted in `commit`
        elif previous is not None:
            (self.directory / previous).unlink()
        self.stats.files_written += 1
        self.stats.bytes_written += path.stat().st_size
        self.stats.seconds += time.perf_counter() - start

    def _read(self, client: int, name: str) -> State:
        start = time.perf_counter()
        path = self.directory / name
        try:
            state = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise self._damaged(client, path, e) from None
        self.stats.bytes_read += path.stat().st_size
        self.stats.seconds += time.perf_counter() - start
        return {k: v.to(self.device) for k, v in state.items()}

    def _check(self, client: int, name: str) -> int:
        """The sequence number of a committed file, after checking it is whole."""
        match = _FILE.fullmatch(name)
        path = self.directory / name
        if match is None or match[1] != str(client):
            raise self._damaged(client, path, "not a state file name for this client")
        try:
            check_owner(path, client)
        except (OSError, SafetensorError, ValueError) as e:
            raise self._damaged(client, path, e) from None
        return int(match[2])

    def _damaged(self, client: int, path: Path, reason: object) -> FedrirError:
        why = "missing" if isinstance(reason, FileNotFoundError) else str(reason).partition("\n")[0]
        return FedrirError(f"client {client}'s state file {path} is unusable ({why}); {_DAMAGED}")

    def _sync_directory(self) -> None:
        sync_directory(self.directory)
        self._unsynced = False


class NodeStore:
    """Clients' states where a Flower node keeps them: one file per client and round that trained
    it (``client3.r7.safetensors``), named back to the server, which names the file to use in its
    every message (so a restarted node or ServerApp picks up exactly the checkpointed state). A
    byte-bounded LRU cache by file name sits in front: a name never changes content, so the cache
    stays right whichever of a node's processes wrote the file."""

    def __init__(self, directory: Path, budget_bytes: int, device: torch.device) -> None:
        self.directory = directory
        self.device = device
        self._cache: StateCache[str] = StateCache(budget_bytes, lambda _, __: None)
        directory.mkdir(parents=True, exist_ok=True)

    def load(self, client: int, name: str) -> State:
        """The state in file ``name`` (as the server named it for ``client``)."""
        state = self._cache.get(name)
        if state is None:
            path = self.directory / name
            if _node_file(client).fullmatch(name) is None:
                raise FedrirError(f"client {client} was sent {name!r}, not one of its state files")
            try:
                check_owner(path, client)
                state = {k: v.to(self.device) for k, v in load_file(str(path)).items()}
            except (OSError, SafetensorError, ValueError) as e:
                why = "missing" if isinstance(e, FileNotFoundError) else str(e).partition("\n")[0]
                raise FedrirError(
                    f"client {client}'s state file {path} is unusable ({why}); the node's state "
                    "folder is damaged or not the one this run wrote; restore it or start a new run"
                ) from None
            self._cache.put(name, state)
        return state

    def save(self, client: int, round_: int, state: State) -> str:
        """Write ``client``'s state after ``round_`` durably; the file's name."""
        name = f"client{client}.r{round_}.safetensors"
        write_state(self.directory / name, state, client)
        sync_directory(self.directory)
        self._cache.put(name, state)
        return name

    def prune(self, client: int, keep: Collection[str]) -> None:
        """Delete ``client``'s files but ``keep`` (the newest, and the one a checkpoint names)."""
        pattern = _node_file(client)
        for path in self.directory.iterdir():
            if pattern.fullmatch(path.name) and path.name not in keep:
                path.unlink(missing_ok=True)


def _node_file(client: int) -> re.Pattern[str]:
    return re.compile(rf"client{client}\.r\d+\.safetensors")
