"""Flower as deployed: the recipe of docs/deployment.md run verbatim (TLS, node authentication,
three SuperNodes with long-lived ClientApps), a SuperNode killed at a known point of a run, and
``--quiet`` on Flower's simulation engine.

Data: scikit-learn's ``digits`` (bundled), 3 clients, 2 rounds.
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
import textwrap
from pathlib import Path

import pytest

import fedrir
from fedrir.cli import main
from fedrir.config import Config, with_overrides
from fedrir.flower.loopback import FLOWER_BIN, ROOT, Loopback, processes_with_home
from fedrir.flower.runner import OFFLINE_ENV
from fedrir.results import RoundRecord, read_metrics

DOCS = ROOT / "docs" / "deployment.md"
RECIPE_PORTS = (9091, 9100, 9101, 9102)


def digits(**overrides: object) -> Config:
    base = {"dataset": "digits", "clients": 3, "rounds": 2, "alpha": 1.0}
    return with_overrides(Config(engine="flower"), base | overrides)


def assert_same_numbers(deployed: list[RoundRecord], sim: list[RoundRecord]) -> None:
    """The in-process engine's numbers, bit for bit (same threads on both sides by default)."""
    assert [r.round for r in deployed] == [r.round for r in sim]
    for d, s in zip(deployed, sim, strict=True):
        assert (d.participants, d.selected, d.evaluated) == (
            s.participants,
            s.selected,
            s.evaluated,
        )
        assert (d.bytes_up, d.bytes_down) == (s.bytes_up, s.bytes_down)
        assert d.client_accuracies == s.client_accuracies
        assert d.accuracy == s.accuracy
        assert d.loss == pytest.approx(s.loss, rel=1e-6)


def recipe() -> str:
    """The bash blocks of the deployment recipe (from its folder to the Stop step), in order."""
    text = DOCS.read_text()
    section = text[text.index("## A real deployment") : text.index("### How long a deployed")]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, re.DOTALL))


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_the_deployment_recipe_runs_verbatim_and_matches_in_process(tmp_path: Path) -> None:
    if any(_port_taken(p) for p in RECIPE_PORTS):
        pytest.skip(f"the recipe's ports {RECIPE_PORTS} are not all free here")
    home, flwr_home = tmp_path / "home", tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "HOME": str(home),
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{FLOWER_BIN}:{os.environ['PATH']}",
    }
    script = tmp_path / "recipe.sh"
    script.write_text("set -e\n" + recipe())
    deploy = home / "fedrir-deploy"
    try:
        done = subprocess.run(
            ["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        logs = {p.name: p.read_text()[-1500:] for p in (deploy / "logs").glob("*.log")}
        assert done.returncode == 0, f"{done.stderr[-3000:]}\n{logs}"
    finally:  # whatever happened, nothing of the deployment outlives the test
        for pid in processes_with_home(flwr_home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # every secret and log is in $DEPLOY, outside the checkout; nothing new inside it
    assert (deploy / "certificates" / "ca.key").exists()
    assert {p.name for p in (deploy / "logs").iterdir()} == {
        "superlink.log",
        "flwr-run.log",
        *(f"{kind}-{i}.log" for kind in ("supernode", "clientapp") for i in range(3)),
    }
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert not re.search(r"\.(key|pem|csr|srl)$", status, re.MULTILINE), status
    assert "fedrir clientapp: serving" in (deploy / "logs" / "clientapp-0.log").read_text()
    # the run: TLS, node authentication, long-lived ClientApps; the in-process numbers
    run = deploy / "run1"
    history = [RoundRecord(**r) for r in read_metrics(run / "metrics.jsonl")]
    assert fedrir.load_config(run / "config.toml") == digits()
    sim = fedrir.run(digits(engine="sim"), out=None)
    assert_same_numbers(history, sim.history)
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["final_accuracy_clients"], summary["final_accuracy_partial"]) == (3, False)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from fedrir.flower.worker import serve_clientapps

    address, supernode = sys.argv[1], int(sys.argv[2])

    def before(message):
        # round 2's training message reached this node: its SuperNode stops before any reply
        if message.metadata.message_type == "train" and message.metadata.group_id == "2":
            os.kill(supernode, signal.SIGTERM)
            os._exit(0)

    serve_clientapps(address, before_task=before)
    """
)


@pytest.mark.slow
def test_a_supernode_killed_at_a_known_point_leaves_a_flagged_partial_result(
    tmp_path: Path,
) -> None:
    """Node 2 stops (SIGTERM to its SuperNode) when round 2's training message reaches it: a
    point in the run given by a message, not by a timer. Round 2 then aggregates the other two
    clients, evaluates the two still there, and every file says so."""
    dep = Loopback(tmp_path)
    try:
        dep.start_superlink()
        for p in (0, 1):
            dep.start_supernode(p, 3)
        dep.start_supernode(2, 3, clientapp=[sys.executable, "-c", KILLER])
        out = tmp_path / "run"
        dep.wait(dep.flwr_run(digits(), out, {"timeout": 300.0}), 600)
        assert (out / "summary.json").exists(), dep.log("flwr-run")
        assert dep.nodes[2].wait(timeout=30) is not None  # the node really is gone
    finally:
        left = dep.close()
    assert not left, f"processes outlived the deployment: {left}"
    history = read_metrics(out / "metrics.jsonl")
    assert [r["participants"] for r in history] == [3, 2]
    assert [r["selected"] for r in history] == [3, 3]
    assert [r["evaluated"] for r in history] == [3, 2]
    assert [sorted(r["client_accuracies"]) for r in history] == [["0", "1", "2"], ["0", "1"]]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["final_accuracy_clients"], summary["final_accuracy_partial"]) == (2, True)
    # round 1 is the uninterrupted run's round 1, bit for bit
    sim = fedrir.run(digits(engine="sim"), out=None)
    assert history[0]["client_accuracies"] == sim.history[0].client_accuracies


@pytest.mark.slow
def test_quiet_silences_flowers_logs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Without --quiet Flower logs every round at INFO (and Ray its start) on stderr."""
    flags = ["--engine", "flower", "--dataset", "digits", "--clients", "2", "--rounds", "1"]
    assert main(["run", *flags, "--quiet", "--out", str(tmp_path / "quiet")]) == 0
    quiet = capfd.readouterr()
    assert "INFO" not in quiet.err and "Ray" not in quiet.err, quiet.err
    assert "final accuracy" in quiet.out
