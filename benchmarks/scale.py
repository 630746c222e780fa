"""Many clients in bounded memory: peak memory, seconds per round, disk written, the store's share.

FedRIR (and FedAvg for contrast) on full MNIST split into 100 and 1 000 clients (Dirichlet α = 1,
at least 20 samples each), 10 % of them training per round, 3 rounds, a seeded sample of 100
clients evaluated on intermediate rounds and every client on the last. Each setting runs in a
process of its own (so that its peak memory is its own), once with the default state cache
(``--state-cache-mb 1024``) and once with a cache large enough for every touched state.

    python benchmarks/scale.py                          # the table (about 15 minutes on 2 cores)
    python benchmarks/scale.py --engine flower --clients 1000 --algorithms fedrir

Peak memory is the larger of the process's peak RSS and the peak, sampled every 0.5 s, of the
memory held by the process and all its descendants (on Flower: Ray's processes and the workers
that run the clients; pages shared between processes counted once). Disk written is what the
process wrote (``wchar`` of /proc/self/io) per round; the store's share
is the time its reads and writes took over the rounds' time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedrir.config import Config, run_identity, with_overrides
from fedrir.engine.checkpoint import Checkpointer
from fedrir.engine.runtime import torch_threads
from fedrir.engine.simulator import open_state, simulate
from fedrir.runs import prepare, run_setting

ALL_IN_MEMORY_MB = 64 * 1024


def tree_pss() -> int:
    """Bytes of memory held by this process and all its descendants (Flower's and Ray's
    processes included), each page shared by several processes counted once in all (PSS)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, grown = {os.getpid()}, True
    while grown:
        new = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree, grown = tree | new, bool(new)
    total = 0
    for pid in tree:
        with contextlib.suppress(OSError, IndexError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    return total


@contextlib.contextmanager
def peak_tree_pss(every: float = 0.5) -> Iterator[list[int]]:
    """Samples :func:`tree_pss` every ``every`` seconds while the block runs; yields a list
    whose one element is the peak so far."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            peak[0] = max(peak[0], tree_pss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def written() -> int:
    """Bytes this process has written so far (files and pipes alike)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def settings(args: argparse.Namespace, algorithm: str, clients: int, cache_mb: int) -> Config:
    return with_overrides(
        Config(),
        {
            "algorithm": algorithm,
            "dataset": "mnist",
            "partition": "dir",
            "alpha": 1.0,
            "min_samples": 20,
            "clients": clients,
            "join_ratio": 0.1,
            "rounds": args.rounds,
            "eval_clients": min(100, clients),
            "state_cache_mb": cache_mb,
            "engine": args.engine,
        },
    )


def measure_in_process(config: Config) -> dict[str, Any]:
    """One run of the in-process engine, checkpointing every round into a scratch run folder."""
    with tempfile.TemporaryDirectory(prefix="fedrir-scale-") as tmp, torch_threads(config):
        algorithm, data = prepare(config)
        folder = Path(tmp) / "checkpoint"
        state = open_state(algorithm, folder, config.state_cache_mb * 2**20)
        setting = run_setting(algorithm, [c.digest() for c in data.clients])
        checkpointer = Checkpointer(folder, run_identity(config), setting, time.perf_counter())
        rounds: list[dict[str, float]] = []
        mark = [written(), time.perf_counter(), state.clients.stats.seconds]

        def on_round(_: object, r: int) -> None:
            now = [written(), time.perf_counter(), state.clients.stats.seconds]
            rounds.append(
                {
                    "round": r,
                    "seconds": now[1] - mark[1],
                    "mb_written": (now[0] - mark[0]) / 1e6,
                    "store_seconds": now[2] - mark[2],
                }
            )
            mark[:] = now

        state = simulate(
            algorithm, config, data, state, checkpointer=checkpointer, on_round=on_round
        )
        return {
            "accuracy": state.ledger.history[-1].accuracy,
            "evaluated": state.ledger.history[-1].evaluated,
            "rounds": rounds,
            "spills": state.clients.stats.spills,
        }


def measure_flower(config: Config) -> dict[str, Any]:
    import fedrir

    with tempfile.TemporaryDirectory(prefix="fedrir-scale-") as tmp:
        start = time.perf_counter()
        seconds: list[float] = []
        result = fedrir.run(
            config,
            out=Path(tmp) / "run",
            on_round=lambda rec, r: seconds.append(
                rec.seconds if rec is not None else float("nan")
            ),
        )
        return {
            "accuracy": result.summary["final_accuracy"],
            "evaluated": result.history[-1].evaluated,
            "rounds": [{"round": i + 1, "seconds": s} for i, s in enumerate(seconds)],
            "wall": time.perf_counter() - start,
        }


def one(args: argparse.Namespace) -> None:
    config = settings(args, args.algorithms, args.clients[0], args.cache_mb)
    with peak_tree_pss() as tree:
        numbers = measure_flower(config) if args.engine == "flower" else measure_in_process(config)
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(numbers | {"peak_rss_gib": usage, "peak_tree_gib": tree[0] / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="fedrir,fedavg")
    parser.add_argument(
        "--clients", default="100,1000", type=lambda s: [int(c) for c in s.split(",")]
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", default="sim", choices=["sim", "flower"])
    parser.add_argument("--cache-mb", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cache_mb is not None:  # a single measurement, in this process
        one(args)
        return
    print(
        "| algorithm | clients | cache | peak memory (GiB) | s / round | MB written / round "
        "| store share | final acc (%) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    caches = {"default (1024 MB)": 1024, "all in memory": ALL_IN_MEMORY_MB}
    if args.engine == "flower":
        caches = {"default (1024 MB)": 1024}
    for algorithm in args.algorithms.split(","):
        for clients in args.clients:
            for label, mb in caches.items():
                cmd = [
                    sys.executable, __file__, "--algorithms", algorithm, "--clients", str(clients),
                    "--rounds", str(args.rounds), "--engine", args.engine, "--cache-mb", str(mb),
                ]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{' '.join(cmd[2:])} failed:\n{done.stderr[-3000:]}")
                out = done.stdout
                r = json.loads(out.strip().splitlines()[-1])
                steady = r["rounds"][1:] or r["rounds"]
                per_round = sum(x["seconds"] for x in steady) / len(steady)
                mb_written = (
                    f"{sum(x['mb_written'] for x in steady) / len(steady):,.0f}"
                    if "mb_written" in steady[0]
                    else "n/a"
                )
                store = sum(x.get("store_seconds", float("nan")) for x in steady)
                share = f"{100 * store / (per_round * len(steady)):.1f} %"
                rss = max(r["peak_rss_gib"], r["peak_tree_gib"])
                print(
                    f"| {algorithm} | {clients:,} | {label} | {rss:.2f} | {per_round:.1f} "
                    f"| {mb_written} | {share} | {100 * r['accuracy']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
