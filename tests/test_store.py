"""The client-state store: exact round trips, lazy initial states, LRU spills, crash safety."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

import fedrir.engine.store
from fedrir.algorithms.base import State
from fedrir.engine.store import ClientStore, NodeStore, StateCache, state_bytes
from fedrir.errors import ConfigError, FedrirError

CPU = torch.device("cpu")
STATE_BYTES = 3 * 2 * 4 + 8  # the float32 3×2 weight and the int64 step counter of `initial`


def initial(client: int) -> State:
    g = torch.Generator().manual_seed(1000 + client)
    return {"w": torch.randn(3, 2, generator=g), "steps": torch.tensor(0)}


def trained(state: State, noise: torch.Tensor) -> State:
    """A new state, as a local update would return it."""
    return {"w": state["w"] * 0.5 + noise, "steps": state["steps"] + 1}


def open_store(
    directory: Path, budget: int = 1 << 30, committed: Mapping[int, str] | None = None
) -> ClientStore:
    return ClientStore(directory, budget, initial, CPU, committed)


def bits(t: torch.Tensor) -> list[int]:
    return t.detach().reshape(-1).view(torch.uint8).tolist()


def assert_identical(a: State, b: State) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].dtype, a[k].shape, a[k].device) == (b[k].dtype, b[k].shape, b[k].device), k
        assert bits(a[k]) == bits(b[k]), k


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_round_trip_is_bit_identical_with_every_dtype(tmp_path: Path) -> None:
    state = {
        "f32": torch.tensor([1.5, -0.0, float("nan"), float("inf"), 1e-45]),
        "f64": torch.tensor([[1 / 3, -2.0]], dtype=torch.float64),
        "bf16": torch.tensor([0.1, -3.0], dtype=torch.bfloat16),
        "f16": torch.tensor([6e-5], dtype=torch.float16),
        "counter": torch.tensor(2**62 + 1, dtype=torch.int64),  # 0-dim, beyond float precision
        "scalar": torch.tensor(0.25),
        "flags": torch.tensor([True, False]),
        "bytes": torch.tensor([0, 255], dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # not contiguous
        "grad": torch.ones(2, requires_grad=True),
    }
    store = open_store(tmp_path, budget=0)  # budget 0: even the same store reads the file back
    store.put(4, state)
    assert_identical(store.get(4), {k: v.detach() for k, v in state.items()})
    files = store.flush()
    store.commit(files)
    assert list(files) == [4]
    assert_identical(open_store(tmp_path, committed=files).get(4), store.get(4))


def test_untouched_client_has_no_file_and_its_initial_state(tmp_path: Path) -> None:
    store = open_store(tmp_path, budget=STATE_BYTES)
    for c in (3, 4, 3):  # 3 is evicted by 4 (clean: dropped), then derived again
        assert_identical(store.get(c), initial(c))
    assert store.flush() == {}
    assert listing(tmp_path) == set()
    assert store.stats.files_written == 0
    assert (store.stats.hits, store.stats.misses) == (0, 3)


def test_flush_writes_only_clients_that_were_put(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    noise = torch.full((3, 2), 0.125)
    for c in range(5):
        store.get(c)
    for c in (1, 3):
        store.put(c, trained(store.get(c), noise))
    files = store.flush()
    store.commit(files)
    assert files == {1: "client1.s000000.safetensors", 3: "client3.s000001.safetensors"}
    assert listing(tmp_path) == set(files.values())
    assert store.stats.files_written == 2
    assert store.stats.bytes_written == sum((tmp_path / f).stat().st_size for f in files.values())
    assert (store.stats.hits, store.stats.misses) == (2, 5)

    assert store.flush() == files  # nothing changed since: nothing written
    assert store.stats.files_written == 2
    assert listing(tmp_path) == set(files.values())


def test_lru_evicts_least_recent_and_spills_only_dirty_states(tmp_path: Path) -> None:
    store = open_store(tmp_path, budget=2 * STATE_BYTES)
    v0 = trained(initial(0), torch.ones(3, 2))
    v1 = trained(initial(1), torch.ones(3, 2))
    store.put(0, v0)
    store.put(1, v1)
    store.get(0)  # 1 is now the least recently used
    store.get(2)  # evicts 1, which is dirty: spilled
    assert listing(tmp_path) == {"client1.s000000.safetensors"}
    assert store.stats.spills == 1
    store.get(3)  # evicts 0: spilled too
    store.get(4)  # evicts 2, clean: dropped, no file
    assert listing(tmp_path) == {"client1.s000000.safetensors", "client0.s000001.safetensors"}
    assert (store.stats.spills, store.stats.files_written) == (2, 2)
    assert_identical(store.get(1), v1)
    assert_identical(store.get(0), v0)
    assert store.stats.bytes_read == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert (store.stats.hits, store.stats.misses) == (1, 5)
    assert store.flush() == {0: "client0.s000001.safetensors", 1: "client1.s000000.safetensors"}
    assert store.stats.files_written == 2  # both were read back clean


def test_budget_zero_writes_every_put_and_reads_every_get(tmp_path: Path) -> None:
    store = open_store(tmp_path, budget=0)
    v = trained(initial(7), torch.ones(3, 2))
    store.put(7, v)
    assert store.stats.files_written == 1
    for _ in range(2):
        assert_identical(store.get(7), v)
    assert (store.stats.hits, store.stats.misses) == (0, 2)
    assert store.stats.bytes_read == 2 * (tmp_path / "client7.s000000.safetensors").stat().st_size
    assert store.flush() == {7: "client7.s000000.safetensors"}
    assert store.stats.files_written == 1


def test_random_gets_and_puts_agree_bitwise_whatever_the_budget(tmp_path: Path) -> None:
    """A random workload (with checkpoints and reopenings) on an unbounded store, one with room
    for two states and one with no cache at all: every state read must be the same."""
    budgets = {"unbounded": 1 << 30, "two": 2 * STATE_BYTES, "zero": 0}
    stores = {name: open_store(tmp_path / name, b) for name, b in budgets.items()}
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        c = rng.randrange(20)
        op = rng.random()
        if op < 0.45:
            got = [s.get(c) for s in stores.values()]
            for other in got[1:]:
                assert_identical(other, got[0])
        elif op < 0.9:
            noise = torch.randn(3, 2, generator=g)
            for s in stores.values():
                s.put(c, trained(s.get(c), noise))
        else:  # a checkpoint; half the time followed by a resume from it
            reopen = rng.random() < 0.5
            for name, s in stores.items():
                files = s.flush()
                s.commit(files)
                assert listing(tmp_path / name) == set(files.values())
                if reopen:
                    stores[name] = open_store(tmp_path / name, budgets[name], files)
    for c in range(20):
        got = [s.get(c) for s in stores.values()]
        for other in got[1:]:
            assert_identical(other, got[0])
    assert stores["unbounded"].stats.spills == 0
    assert stores["two"].stats.spills > 0


def test_kill_before_the_manifest_resumes_from_the_committed_states(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")  # the checkpoint's own files: not the store's
    (tmp_path / "server.r1.safetensors").write_bytes(b"server")
    store = open_store(tmp_path)
    v1 = {c: trained(initial(c), torch.ones(3, 2)) for c in (0, 1)}
    for c, v in v1.items():
        store.put(c, v)
    committed = store.flush()
    store.commit(committed)
    for c in (0, 1, 2):
        store.put(c, trained(store.get(c), torch.full((3, 2), 2.0)))
    store.flush()  # the newer files are on disk, but the process dies before the manifest
    (tmp_path / ".client0.s000009.safetensors.tmp").write_bytes(b"half")  # killed mid-write

    resumed = open_store(tmp_path, committed=committed)
    assert listing(tmp_path) == set(committed.values()) | {"manifest.json", "server.r1.safetensors"}
    for c, v in v1.items():
        assert_identical(resumed.get(c), v)
    assert_identical(resumed.get(2), initial(2))


def test_kill_after_the_manifest_before_commit_keeps_what_it_names(tmp_path: Path) -> None:
    store = open_store(tmp_path, budget=0)
    v1 = trained(initial(0), torch.ones(3, 2))
    store.put(0, v1)
    files = store.flush()  # the manifest naming `files` is written, then (before commit) …
    store.put(0, trained(v1, torch.ones(3, 2)))  # … a spill supersedes the file it names
    assert set(files.values()) <= listing(tmp_path)
    assert_identical(open_store(tmp_path, committed=files).get(0), v1)


def test_commit_deletes_superseded_files_and_never_a_named_one(tmp_path: Path) -> None:
    store = open_store(tmp_path, budget=0)
    noise = torch.ones(3, 2)
    store.put(0, trained(initial(0), noise))
    store.put(1, trained(initial(1), noise))
    first = store.flush()
    store.commit(first)
    store.put(0, trained(store.get(0), noise))  # supersedes a committed file: kept for now
    store.put(0, trained(store.get(0), noise))  # supersedes an uncommitted one: deleted at once
    assert listing(tmp_path) == set(first.values()) | {"client0.s000003.safetensors"}
    second = store.flush()
    assert second == {0: "client0.s000003.safetensors", 1: first[1]}
    store.put(0, trained(store.get(0), noise))  # a spill between a flush and its commit …
    store.commit(second)
    assert listing(tmp_path) == set(second.values()) | {"client0.s000004.safetensors"}
    third = store.flush()
    store.commit(third)  # … and the file it superseded goes with the next commit
    assert listing(tmp_path) == set(third.values()) == {"client0.s000004.safetensors", first[1]}


def test_sequence_continues_above_committed_names_after_reopen(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for step in range(3):
        store.put(step % 2, trained(initial(step % 2), torch.full((3, 2), float(step))))
        store.flush()
    files = store.flush()
    store.commit(files)
    assert files == {0: "client0.s000002.safetensors", 1: "client1.s000001.safetensors"}
    before = {name: (tmp_path / name).read_bytes() for name in files.values()}

    resumed = open_store(tmp_path, committed=files)
    resumed.put(1, trained(resumed.get(1), torch.ones(3, 2)))
    resumed.put(5, trained(resumed.get(5), torch.ones(3, 2)))
    assert resumed.flush() == {
        0: "client0.s000002.safetensors",
        1: "client1.s000003.safetensors",
        5: "client5.s000004.safetensors",
    }
    assert {name: (tmp_path / name).read_bytes() for name in files.values()} == before


def test_flush_makes_spilled_names_durable_before_a_manifest_can_name_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = open_store(tmp_path, budget=0)
    store.put(3, initial(3))  # spilled at once: nothing is dirty at the flush
    store.flush()
    assert synced == [".client3.s000000.safetensors.tmp", tmp_path.name]
    store.flush()  # nothing new: no sync
    assert len(synced) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "other client", "escape"])
def test_damaged_committed_file_is_one_clear_line(tmp_path: Path, damage: str) -> None:
    store = open_store(tmp_path)
    store.put(0, trained(initial(0), torch.ones(3, 2)))
    store.put(1, trained(initial(1), torch.ones(3, 2)))
    files = store.flush()
    path = tmp_path / files[1]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-4])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 40)
    elif damage == "missing":
        path.unlink()
    elif damage == "other client":
        files[1] = files[0]
    else:
        files[1] = "../client1.s000001.safetensors"
    with pytest.raises(FedrirError) as err:
        open_store(tmp_path, committed=files)
    message = str(err.value)
    assert "\n" not in message
    assert "client 1's state file" in message and str(tmp_path / files[1]) in message
    assert message.endswith("the checkpoint is damaged; restore it or start a new run")


def test_file_damaged_after_open_is_reported_on_get(tmp_path: Path) -> None:
    store = open_store(tmp_path, budget=0)
    store.put(2, trained(initial(2), torch.ones(3, 2)))
    path = tmp_path / store.flush()[2]
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(FedrirError, match=r"client 2's state file .* \(Error while deserializing"):
        store.get(2)


def test_cache_gives_memory_back_each_time_enough_states_left_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released: list[int] = []
    evicted: list[int] = []
    monkeypatch.setattr(fedrir.engine.store, "_TRIM_EVERY", 2 * STATE_BYTES)
    monkeypatch.setattr(fedrir.engine.store, "release_free_memory", lambda: released.append(1))
    cache: StateCache[int] = StateCache(STATE_BYTES, lambda k, _: evicted.append(k))
    for client in range(7):
        cache.put(client, initial(client))
    # six states pushed out, two at a time between hand-backs; the newest is still cached
    assert evicted == [0, 1, 2, 3, 4, 5] and len(released) == 3
    assert cache.get(6) is not None and cache.get(5) is None


def test_state_bytes_and_negative_budget() -> None:
    assert state_bytes(initial(0)) == STATE_BYTES
    with pytest.raises(ConfigError, match="set it to 0 or more"):
        ClientStore(Path("unused"), -1, initial, CPU)


# --- a Flower node's store ----------------------------------------------------------------------


def test_node_store_files_are_named_by_client_and_round_and_read_back_exactly(
    tmp_path: Path,
) -> None:
    node = NodeStore(tmp_path, 0, CPU)  # no cache: every load reads its file
    first = trained(initial(3), torch.ones(3, 2))
    name = node.save(3, 1, first)
    assert name == "client3.r1.safetensors" and (tmp_path / name).exists()
    again = NodeStore(tmp_path, 1 << 20, CPU).load(3, name)  # another process of the node
    assert all(bits(again[k]) == bits(first[k]) and again[k].dtype == first[k].dtype for k in first)
    # prune keeps what the server named and the newest file, and only touches this client
    second = node.save(3, 2, trained(first, torch.zeros(3, 2)))
    third = node.save(3, 3, trained(first, torch.ones(3, 2)))
    other = node.save(4, 1, initial(4))
    node.prune(3, {name, third})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, third, other])
    with pytest.raises(FedrirError, match=r"client 3's state file .* unusable"):
        node.load(3, second)
    with pytest.raises(FedrirError, match="not one of its state files"):
        node.load(3, other)
