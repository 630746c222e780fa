"""The in-process simulator: the round loop, written once for every algorithm.

Per round: plan (who takes part), broadcast, local updates, aggregation, and on evaluation rounds
personalized evaluation of *every* client, then a checkpoint. Bytes are counted from the payloads
actually handed over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedrir.algorithms.base import Algorithm, Payload, State, payload_bytes
from fedrir.config import Config
from fedrir.data.types import FederatedData
from fedrir.engine import rounds
from fedrir.engine.checkpoint import COUNTERS, Checkpointer, Snapshot
from fedrir.results import RoundRecord, pooled, weighted_metrics


@dataclass
class SimState:
    """Everything the loop carries from one round to the next (and into checkpoints)."""

    round: int
    server: Payload
    clients: list[State]
    history: list[RoundRecord] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0

    def snapshot(self) -> Snapshot:
        return Snapshot(
            round=self.round,
            server=self.server,
            clients=self.clients,
            history=[r.to_json() for r in self.history],
            counters={name: getattr(self, name) for name in COUNTERS},
        )

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> SimState:
        return cls(
            round=snap.round,
            server=snap.server,
            clients=snap.clients,
            history=[RoundRecord(**r) for r in snap.history],
            bytes_up=int(snap.counters["bytes_up"]),
            bytes_down=int(snap.counters["bytes_down"]),
            seconds=float(snap.counters["seconds"]),
        )


def initial_state(algorithm: Algorithm, config: Config, num_clients: int) -> SimState:
    return SimState(
        round=0,
        server=algorithm.init_server(rounds.server_seed(config)),
        clients=[
            algorithm.init_client(c, rounds.client_seed(config, c)) for c in range(num_clients)
        ],
    )


def evaluate_all(
    algorithm: Algorithm, config: Config, data: FederatedData, state: SimState
) -> dict[str, object]:
    payload = algorithm.broadcast(state.server)
    evals = [
        algorithm.evaluate(
            payload,
            state.clients[c],
            data.clients[c],
            algorithm.runtime.generator(rounds.eval_seed(config, state.round, c)),
        )
        for c in range(data.num_clients)
    ]
    return pooled(evals)


def simulate(
    algorithm: Algorithm,
    config: Config,
    data: FederatedData,
    state: SimState,
    *,
    checkpointer: Checkpointer | None = None,
    on_round: Callable[[RoundRecord | None, int], None] | None = None,
) -> SimState:
    """Run rounds ``state.round + 1 … config.rounds``; ``on_round(record, round)`` after each."""
    runtime = algorithm.runtime
    dirty: set[int] = set(range(data.num_clients)) if state.round == 0 else set()
    while state.round < config.rounds:
        start = time.perf_counter()
        r = state.round + 1
        plan = rounds.plan_round(config, r, data.num_clients)
        down = algorithm.broadcast(state.server)
        bytes_down = payload_bytes(down) * len(plan.selected)
        updates, metrics, bytes_up = [], [], 0
        for c in plan.participants:  # a dropped client fails mid-round: nothing comes back
            rng = runtime.generator(rounds.train_seed(config, r, c))
            update = algorithm.local_update(down, state.clients[c], data.clients[c], rng)
            state.clients[c] = update.state
            dirty.add(c)
            updates.append((update.payload, update.num_examples))
            metrics.append((update.metrics, update.num_examples))
            bytes_up += payload_bytes(update.payload)
        state.server = algorithm.aggregate(state.server, updates)
        state.round = r
        state.bytes_up += bytes_up
        state.bytes_down += bytes_down
        ev = (
            evaluate_all(algorithm, config, data, state)
            if rounds.is_eval_round(config, r)
            else None
        )
        seconds = time.perf_counter() - start
        state.seconds += seconds
        record = None
        if ev is not None:
            record = RoundRecord(
                round=r,
                participants=len(plan.participants),
                selected=len(plan.selected),
                bytes_up=bytes_up,
                bytes_down=bytes_down,
                bytes_up_total=state.bytes_up,
                bytes_down_total=state.bytes_down,
                seconds=seconds,
                elapsed=state.seconds,
                train=weighted_metrics(metrics),
                **ev,  # type: ignore[arg-type]
            )
            state.history.append(record)
        if checkpointer is not None and (
            r == config.rounds or (config.checkpoint_every and r % config.checkpoint_every == 0)
        ):
            checkpointer.save(state.snapshot(), dirty)
            dirty = set()
        if on_round is not None:
            on_round(record, r)
    return state
