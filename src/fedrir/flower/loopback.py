"""A Flower deployment on this machine's loopback, as separate processes: a SuperLink, one
SuperNode per client, and beside each SuperNode one long-lived ``fedrir clientapp``.

Used by the deployment tests and ``benchmarks/deployment.py``; ``docs/deployment.md`` runs the
same processes by hand, with TLS and node authentication. Here everything is ``--insecure`` (a
test on loopback: nothing leaves the machine). Each process logs to its own file in
``<folder>/logs/`` (``superlink.log``, ``supernode-<i>.log``, ``clientapp-<i>.log``,
``flwr-run.log``), so a refused or failing node's error is there to read; every process gets
its own session and a private ``FLWR_HOME``, and :meth:`Loopback.close` stops them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from flwr.app import UserConfigValue

from fedrir.config import Config, toml_value
from fedrir.errors import FedrirError
from fedrir.flower.app import to_run_config
from fedrir.flower.runner import OFFLINE_ENV

FLOWER_BIN = Path(sys.executable).parent
"""Where ``flower-superlink``, ``flower-supernode`` and ``flwr`` are installed."""

ROOT = Path(__file__).resolve().parents[3]
"""The checkout holding ``pyproject.toml``: the Flower app that ``flwr run .`` bundles."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processes_with_home(home: Path) -> list[int]:
    """Live processes (zombies aside) whose environment has ``FLWR_HOME=home``: what a loopback
    deployment started, down to Flower's own helpers."""
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


class Loopback:
    """The processes of one loopback deployment, their logs in ``folder/logs``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.home = folder / "flwr-home"
        self.logs = folder / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.port = free_port()
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.home)}
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n'
            f'[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.clientapps: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own session, its output in ``logs/<name>.log``."""
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_superlink(self, timeout: float = 60.0) -> None:
        """The SuperLink, listening on ``127.0.0.1:<port>`` for SuperNodes, ``flwr`` and the
        ServerApp; returns once the port accepts connections."""
        proc = self.start(
            "superlink",
            [
                str(FLOWER_BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                raise FedrirError(f"the SuperLink did not start:\n{self.log('superlink')}")
            time.sleep(0.3)

    def start_supernode(
        self,
        partition: int,
        num_partitions: int,
        *,
        long_lived: bool = True,
        clientapp: Sequence[str] | None = None,
        supernode: Sequence[str] | None = None,
    ) -> None:
        """The SuperNode holding client ``partition``. ``long_lived``: with process isolation
        and one ``fedrir clientapp`` beside it (``clientapp``: another command for that process,
        given the Runtime API's address and the SuperNode's pid as its last two arguments);
        otherwise Flower's default, a new ClientApp process per message. ``supernode``: a
        command to run instead of ``flower-supernode`` (taking its arguments)."""
        runtime = free_port()
        cmd = [
            *(supernode or [str(FLOWER_BIN / "flower-supernode")]),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(runtime),
            "--node-config",
            f"partition-id={partition} num-partitions={num_partitions}",
        ]
        if long_lived:
            cmd += ["--isolation", "process"]
        node = self.nodes[partition] = self.start(f"supernode-{partition}", cmd)
        if long_lived:
            address = f"127.0.0.1:{runtime}"
            worker = clientapp or [
                sys.executable,
                "-m",
                "fedrir.cli",
                "clientapp",
                "--runtime-api-address",
            ]
            parent = [] if clientapp else ["--parent-pid"]
            self.clientapps[partition] = self.start(
                f"clientapp-{partition}",
                [*worker, address, *parent, str(node.pid)],
            )

    def flwr_run(
        self, config: Config, out: Path, settings: Mapping[str, UserConfigValue] | None = None
    ) -> subprocess.Popen[bytes]:
        """``flwr run . loopback --stream`` with ``config`` as run config (plus app
        ``settings``), results in ``out``; returns the running ``flwr`` process."""
        if not (ROOT / "pyproject.toml").is_file():
            raise FedrirError(f"flwr run . needs fedrir's checkout; {ROOT} has no pyproject.toml")
        values = to_run_config(config) | {"out-dir": str(out), **(settings or {})}
        run_config = " ".join(f"{k}={toml_value(v)}" for k, v in values.items())
        flwr = str(FLOWER_BIN / "flwr")
        return self.start(
            "flwr-run", [flwr, "run", ".", "loopback", "--run-config", run_config, "--stream"]
        )

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Wait for ``proc`` (a ``flwr run``) to end; an error with its log if it does not."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FedrirError(
                f"flwr run did not finish in {timeout:.0f} s:\n{self.log('flwr-run')}"
            ) from None

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to ``proc``'s session and wait for it (then SIGKILL if it lingers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def close(self) -> list[int]:
        """Stop every process started here; the pids of any that outlived them (then killed)."""
        for proc in reversed(self.procs):
            self.stop(proc)
        deadline = time.monotonic() + 20  # Flower's helpers exit once they see their parent gone
        while (left := processes_with_home(self.home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def log(self, name: str, tail: int = 3000) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-tail:]


@contextlib.contextmanager
def loopback(
    folder: Path,
    clients: int,
    *,
    long_lived: bool = True,
    supernode: Sequence[str] | None = None,
) -> Iterator[Loopback]:
    """A SuperLink and ``clients`` SuperNodes (each with its long-lived ClientApp when
    ``long_lived``), stopped on exit; an error if any process outlived the deployment."""
    dep = Loopback(folder)
    try:
        dep.start_superlink()
        for p in range(clients):
            dep.start_supernode(p, clients, long_lived=long_lived, supernode=supernode)
        yield dep
    finally:
        left = dep.close()
        if left:
            raise FedrirError(f"processes outlived the loopback deployment: {left}")
