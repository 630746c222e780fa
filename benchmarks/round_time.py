"""Seconds per FedRIR round, throughput, peak memory, and the engine's overhead over bare compute.

Setting: MNIST, 20 clients, Dirichlet α = 0.1, evaluating every round (the reference's protocol).
The bare compute is the same forward/backward passes (FedRIR's own steps on its workspace, same
batch counts, tensors already in memory) run in a plain loop in the same process, right after the
engine's rounds, so both figures come from the same machine state.

    python benchmarks/round_time.py --rounds 3
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from fedrir.algorithms.base import EVAL_BATCH
from fedrir.algorithms.fedrir import FedRIR
from fedrir.config import Config, with_overrides
from fedrir.engine.simulator import open_state, simulate
from fedrir.runs import prepare


def bare_round(algorithm: FedRIR, sizes: list[tuple[int, int]]) -> float:
    """One round's passes with no engine: per client, FedRIR's own stage-1 and stage-2 steps and
    its prediction, on the workspace as it is (no state loaded or saved), random tensors of the
    client's sizes already in memory, a plain loop over the batches."""
    rt, b = algorithm.runtime, algorithm.config.train.batch_size
    shape, classes = algorithm.task.input_shape, algorithm.task.num_classes
    rng = rt.generator(0)
    stage1, stage2 = algorithm.mcsl_step(rng), algorithm.classifier_step()
    algorithm.modules.train()
    start = time.perf_counter()
    for n_train, n_test in sizes:
        x_all = rt.input(torch.randn(max(n_train, n_test), *shape))
        y_all = torch.randint(0, classes, (len(x_all),))
        batches = [slice(i * b, (i + 1) * b) for i in range(max(1, n_train // b))]
        for step in (stage1, stage2):
            for s in batches:
                step(x_all[s], y_all[s])
        algorithm.modules.eval()
        with torch.no_grad(), rt.autocast():
            for i in range(0, n_test, EVAL_BATCH):
                algorithm.predict(x_all[i : i + EVAL_BATCH])
        algorithm.modules.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="engine checkpoints (0: off, to time the loop alone)",
    )
    args = parser.parse_args()
    config = with_overrides(
        Config(),
        {
            "rounds": args.rounds,
            "clients": args.clients,
            "alpha": args.alpha,
            "precision": args.precision,
            "eval_every": 1,
            "checkpoint_every": args.checkpoint_every,
        },
    )
    algorithm, data = prepare(config)
    rt = algorithm.runtime
    n_train = sum(c.num_train for c in data.clients)
    n_test = sum(c.num_eval for c in data.clients)
    print(
        f"threads {torch.get_num_threads()}, device {rt.device}, "
        f"precision {'bf16' if rt.autocast_dtype else 'fp32'}, channels_last {rt.channels_last}"
    )
    print(f"{data.num_clients} clients, {n_train} training and {n_test} test images")

    state = open_state(algorithm, Path(tempfile.mkdtemp(prefix="fedrir-bench-")), 2**40)
    times: list[float] = []
    state = simulate(
        algorithm,
        config,
        data,
        state,
        on_round=lambda rec, r: times.append(rec.seconds if rec else float("nan")),
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert isinstance(algorithm, FedRIR)
    bare = bare_round(algorithm, [(c.num_train, c.num_eval) for c in data.clients])
    steady = times[1:] if len(times) > 1 else times
    per_round = sum(steady) / len(steady)
    print(
        f"rounds (s): {', '.join(f'{t:.1f}' for t in times)}  "
        f"accuracy after round {config.rounds}: {100 * state.ledger.history[-1].accuracy:.2f} %"
    )
    print(f"seconds per round (rounds 2+): {per_round:.1f}")
    print(f"training images per second (both stages, one epoch each): {n_train / per_round:.0f}")
    print(f"peak memory (RSS): {peak:.2f} GiB")
    print(f"bare compute of the same passes: {bare:.1f} s per round")
    print(f"engine overhead over bare compute: {100 * (per_round / bare - 1):+.1f} %")


if __name__ == "__main__":
    main()
