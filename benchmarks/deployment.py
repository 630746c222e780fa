"""Seconds per round of a deployed run (SuperLink + SuperNodes + long-lived ClientApps on loopback,
:mod:`fedrir.flower.loopback`) against the in-process round on the same settings.

Settings: FedRIR, 3 clients, Dirichlet α = 1, one torch thread per process; ``digits`` (3 rounds)
and 5 % of MNIST (2 rounds). One thread, because the three ClientApps share this machine's cores:
with two threads each (the default on 2 cores) their oneDNN threads spin against each other, and
the busiest ClientApp took 8.4 s per MNIST round for work the in-process engine does in 0.5 s.
For each: the in-process run, then the deployed run (each SuperNode with ``--isolation process``
and one ``fedrir clientapp``), and with ``--variants`` also Flower's default (a new ClientApp
process per message) and the long-lived setup with the SuperNode's idle poll shortened (a
measurement of where the rest of the time goes, not something fedrir ships). A round's seconds
are the records' (training + aggregation + evaluation: from sending the round's first message to
the last reply closing it), the first round included; with long-lived ClientApps, also the
busiest ClientApp's own seconds per round (from their logs): the rest of a deployed round is
waiting. The target is the in-process round × 1.5 plus the round's message bytes at
``--link-mbit``.

    python benchmarks/deployment.py [--variants] [--link-mbit 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fedrir
from fedrir.config import Config, with_overrides
from fedrir.flower.loopback import loopback

SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"dataset": "digits", "rounds": 3},
    "mnist-5%": {"dataset": "mnist", "fraction": 0.05, "rounds": 2},
}
COMMON = {
    "clients": 3,
    "partition": "dir",
    "alpha": 1.0,
    "checkpoint_every": 0,
    "device": "cpu",
    "threads": 1,
}

SHORT_POLL = """
import sys, time
import flwr.supernode.start_client_internal as node
class _Time:  # the module's `time`, with its idle sleep (3 s) cut to 0.1 s
    def __getattr__(self, name): return getattr(time, name)
    def sleep(self, s): time.sleep(min(s, 0.1))
node.time = _Time()
from flwr.supernode.cli import flower_supernode
sys.argv[0] = "flower-supernode"
flower_supernode()
"""
"""The SuperNode with the 3 s sleep of its message loop (``start_client_internal``, "If no message
was received, wait for a while") and its 0.5 s reply wait cut to 0.1 s: the benchmark's
measurement of what Flower's fixed polling costs."""


def per_round(summary: dict[str, Any]) -> dict[str, float]:
    rounds = summary["rounds"]
    message_bytes = (
        summary["message_bytes_uploaded"]
        + summary["message_bytes_downloaded"]
        + summary["bytes_evaluation_downloaded"]
    )
    return {
        "seconds": summary["seconds_per_round"],
        "bytes": message_bytes / rounds,
        "accuracy": summary["final_accuracy"],
    }


HANDLED = re.compile(r"message \(round (\d+)\) handled in ([\d.]+) s")


def busy_per_round(logs: Path) -> float | None:
    """Mean over rounds of the busiest ClientApp's seconds in that round (training and
    evaluation), from the ``fedrir clientapp`` logs; None without them."""
    rounds: dict[str, list[float]] = {}
    for path in logs.glob("clientapp-*.log"):
        node: dict[str, float] = {}
        for round_, seconds in HANDLED.findall(path.read_text(errors="replace")):
            node[round_] = node.get(round_, 0.0) + float(seconds)
        for round_, seconds in node.items():
            rounds.setdefault(round_, []).append(seconds)
    return sum(map(max, rounds.values())) / len(rounds) if rounds else None


def deployed(config: Config, folder: Path, **options: Any) -> dict[str, float]:
    with loopback(folder, config.data.clients, **options) as dep:
        start = time.perf_counter()
        dep.wait(dep.flwr_run(config, folder / "run", {"timeout": 600.0}), 1800)
        wall = time.perf_counter() - start
        if not (folder / "run" / "summary.json").exists():
            sys.exit(f"the deployed run failed:\n{dep.log('flwr-run')}")
    summary = json.loads((folder / "run" / "summary.json").read_text())
    busy = busy_per_round(dep.logs)
    return per_round(summary) | {"wall": wall} | ({} if busy is None else {"busy": busy})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", action="store_true", help="also Flower's default isolation")
    parser.add_argument("--link-mbit", type=float, default=1000.0, help="link for the target")
    parser.add_argument("--only", choices=sorted(SETTINGS), help="one setting")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, setting in SETTINGS.items():
        if args.only and name != args.only:
            continue
        config = with_overrides(Config(engine="flower"), COMMON | setting)
        sim = per_round(fedrir.run(with_overrides(config, {"engine": "sim"}), out=None).summary)
        rows = {"in-process": sim}
        with tempfile.TemporaryDirectory(prefix="fedrir-deploy-bench-") as tmp:
            rows["deployed, long-lived ClientApps"] = deployed(config, Path(tmp) / "a")
            if args.variants:
                rows["deployed, Flower's default (a process per message)"] = deployed(
                    config, Path(tmp) / "b", long_lived=False
                )
                rows["deployed, long-lived + SuperNode poll 0.1 s"] = deployed(
                    config, Path(tmp) / "c", supernode=[sys.executable, "-c", SHORT_POLL]
                )
        transfer = rows["deployed, long-lived ClientApps"]["bytes"] * 8 / (args.link_mbit * 1e6)
        target = 1.5 * sim["seconds"] + transfer
        print(f"\n{name}: {config.rounds} rounds, {config.data.clients} clients")
        print(f"  target: 1.5 × {sim['seconds']:.2f} s + {transfer:.3f} s = {target:.2f} s/round")
        for label, row in rows.items():
            ratio = row["seconds"] / sim["seconds"]
            wall = f", wall {row['wall']:.0f} s" if "wall" in row else ""
            if "busy" in row:
                wall += f", busiest ClientApp {row['busy']:.2f} s/round"
            print(
                f"  {label:<52} {row['seconds']:6.2f} s/round  ×{ratio:5.2f}  "
                f"{row['bytes'] / 2**20:6.2f} MiB/round  acc {100 * row['accuracy']:.2f} %{wall}"
            )


if __name__ == "__main__":
    main()
