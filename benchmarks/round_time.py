"""Seconds per FedRIR round, throughput, peak memory, and the engine's overhead over bare compute.

Setting: MNIST, 20 clients, Dirichlet α = 0.1, evaluating every round (the reference's protocol).
The bare compute is the same forward/backward passes (same modules, same batch counts, tensors
already in memory) run in a plain loop in the same process, right after the engine's rounds, so
both figures come from the same machine state.

    python benchmarks/round_time.py --rounds 3
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from fedrir.algorithms.fedrir import mask_patches
from fedrir.api import prepare
from fedrir.config import Config, with_overrides
from fedrir.engine.simulator import initial_state, simulate
from fedrir.models.cnn import Encoder, GaussianMLP, Generator


def bare_round(
    config: Config,
    data: list[tuple[int, int]],
    shape: tuple[int, int, int],
    runtime_cl: bool,
    dtype: torch.dtype | None,
) -> float:
    """One round's passes with no engine: per client, stage 1, stage 2, evaluation."""
    d, b = config.train.embed_dim, config.train.batch_size
    fmt = torch.channels_last if runtime_cl else torch.contiguous_format
    gfe, csfe = Encoder(shape, d), Encoder(shape, 2 * d)
    gen, idm, head = Generator(shape, d), GaussianMLP(d), torch.nn.Linear(2 * d, 10)
    for m in (gfe, csfe, gen, idm, head):
        m.to(memory_format=fmt)  # type: ignore[call-overload]
    opt1 = torch.optim.Adam([*csfe.parameters(), *gen.parameters()], lr=5e-4)
    opt2 = torch.optim.Adam([*gfe.parameters(), *idm.parameters(), *head.parameters()], lr=5e-4)
    rng = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)
    start = time.perf_counter()
    for n_train, n_test in data:
        x_all = torch.randn(max(n_train, n_test), *shape).contiguous(memory_format=fmt)
        y_all = torch.randint(0, 10, (len(x_all),))
        steps = max(1, n_train // b)
        for i in range(steps):
            x = x_all[i * b : (i + 1) * b]
            with autocast:
                mean, logvar = csfe(mask_patches(x, 0.6, 4, rng)).float().chunk(2, 1)
                z = mean + torch.randn(mean.shape, generator=rng) * (0.5 * logvar).exp()
                loss = F.mse_loss(gen(z).float(), x)
            loss = loss + 0.1 * (-0.5 * (1 + logvar - mean**2 - logvar.exp())).sum(1).mean()
            opt1.zero_grad()
            loss.backward()
            opt1.step()
        for i in range(steps):
            x, y = x_all[i * b : (i + 1) * b], y_all[i * b : (i + 1) * b]
            with autocast:
                with torch.no_grad():
                    f_cs = csfe(x)[:, :d].float()
                f_g = gfe(x).float()
                mu, lv = idm(f_g)
                loss = F.cross_entropy(head(torch.cat([f_g, f_cs], 1)).float(), y)
            loss = loss + ((mu.float() - f_cs) ** 2 / lv.float().exp() + lv.float()).sum(1).mean()
            opt2.zero_grad()
            loss.backward()
            opt2.step()
        with torch.no_grad(), autocast:
            for i in range(0, n_test, 1000):
                x = x_all[i : i + 1000]
                head(torch.cat([gfe(x).float(), csfe(x)[:, :d].float()], 1))
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
    n_test = sum(c.num_test for c in data.clients)
    print(
        f"threads {torch.get_num_threads()}, device {rt.device}, "
        f"precision {'bf16' if rt.autocast_dtype else 'fp32'}, channels_last {rt.channels_last}"
    )
    print(f"{data.num_clients} clients, {n_train} training and {n_test} test images")

    state = initial_state(algorithm, config, data.num_clients)
    times: list[float] = []
    state = simulate(
        algorithm,
        config,
        data,
        state,
        on_round=lambda rec, r: times.append(rec.seconds if rec else float("nan")),
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shape = data.input_shape
    sizes = [(c.num_train, c.num_test) for c in data.clients]
    bare = bare_round(config, sizes, shape, rt.channels_last, rt.autocast_dtype)
    steady = times[1:] if len(times) > 1 else times
    per_round = sum(steady) / len(steady)
    print(
        f"rounds (s): {', '.join(f'{t:.1f}' for t in times)}  "
        f"accuracy after round {config.rounds}: {100 * state.history[-1].accuracy:.2f} %"
    )
    print(f"seconds per round (rounds 2+): {per_round:.1f}")
    print(f"training images per second (both stages, one epoch each): {n_train / per_round:.0f}")
    print(f"peak memory (RSS): {peak:.2f} GiB")
    print(f"bare compute of the same passes: {bare:.1f} s per round")
    print(f"engine overhead over bare compute: {100 * (per_round / bare - 1):+.1f} %")


if __name__ == "__main__":
    main()
