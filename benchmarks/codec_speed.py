"""Milliseconds per encode and decode of each codec on the 582k-parameter FedAvg payload (MNIST).

The payload has the shapes of the baselines' whole model for 1×28×28 inputs (the GFE trunk and
embedding, then a linear head: 582 218 parameters, 2.3 MB, plus BatchNorm buffers), what FedAvg
sends each way, filled with Gaussian values of an update's size. The wall time is the fastest of
the repeats (the least disturbed by other processes on shared cores); the CPU time is this
process's, median over the repeats. On busy shared cores ``--threads 1`` measures the work itself
(two threads then wait on each other).

    python benchmarks/codec_speed.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fedrir.engine.codecs import parse_codec
from fedrir.models.cnn import Encoder

SPECS = ("none", "fp16", "bf16", "int8", "qsgd:4", "qsgd:1", "topk:0.01", "topk:0.01+int8")


def payload(seed: int) -> dict[str, torch.Tensor]:
    """The model's tensors with Gaussian values of an update's scale (the shapes are what count)."""
    g = torch.Generator().manual_seed(seed)
    body, head = Encoder((1, 28, 28), 512), torch.nn.Linear(512, 10)
    shapes = {
        **{f"body.{k}": v for k, v in body.state_dict().items()},
        **{f"head.{k}": v for k, v in head.state_dict().items()},
    }
    return {
        k: torch.randn(v.shape, generator=g) * 1e-3 if v.is_floating_point() else v
        for k, v in shapes.items()
    }


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(fastest wall ms, median CPU ms) over ``repeats`` calls, after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return 1000 * min(wall), 1000 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tensors = payload(0)
    params = sum(t.numel() for k, t in tensors.items() if "running" not in k and "num_b" not in k)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"{params:,} parameters, {size / 1e6:.2f} MB, {torch.get_num_threads()} torch threads")
    print(f"{'spec':<16}{'bytes':>10}{'ratio':>8}{'encode ms':>16}{'decode ms':>16}")
    print(f"{'':<16}{'':>10}{'':>8}{'wall / cpu':>16}{'wall / cpu':>16}")
    for spec in SPECS:
        codec, rng = parse_codec(spec), torch.Generator().manual_seed(0)
        encoded, _ = codec.encode(tensors, rng, None)
        sent = sum(t.numel() * t.element_size() for t in encoded.values())
        enc = timed(lambda c=codec, g=rng: c.encode(tensors, g, None), args.repeats)
        dec = timed(lambda c=codec, e=encoded: c.decode(e), args.repeats)
        print(
            f"{spec:<16}{sent:>10}{size / sent:>8.1f}"
            f"{enc[0]:>8.1f} / {enc[1]:<5.1f}{dec[0]:>8.1f} / {dec[1]:<5.1f}"
        )


if __name__ == "__main__":
    main()
