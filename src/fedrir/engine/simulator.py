"""The in-process simulator: the round loop, written once for every algorithm.

Per round: plan (who takes part), broadcast, local updates, aggregation, and on evaluation rounds
personalized evaluation of *every* client, then the round is closed (:mod:`.ledger`) and a
checkpoint written. Bytes are counted from the payloads actually handed over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedrir import streams
from fedrir.algorithms.base import Algorithm, Payload, State, payload_bytes
from fedrir.config import Config
from fedrir.data.types import FederatedData
from fedrir.engine import rounds
from fedrir.engine.checkpoint import Checkpointer, Snapshot
from fedrir.engine.ledger import Ledger, Traffic
from fedrir.results import RoundRecord


@dataclass
class SimState:
    """Everything the loop carries from one round to the next (and into checkpoints)."""

    round: int
    server: Payload
    clients: list[State]
    ledger: Ledger = field(default_factory=Ledger)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            round=self.round,
            server=self.server,
            clients=self.clients,
            history=[r.to_json() for r in self.ledger.history],
            counters=self.ledger.counters(),
        )

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> SimState:
        return cls(
            snap.round, snap.server, snap.clients, Ledger.restore(snap.history, snap.counters)
        )


def initial_state(algorithm: Algorithm, num_clients: int) -> SimState:
    return SimState(
        round=0,
        server=rounds.initial_server(algorithm),
        clients=[rounds.initial_client(algorithm, c) for c in range(num_clients)],
    )


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
        down = payload_bytes(state.server) * len(plan.selected)
        updates, trained, up = [], [], 0
        for c in plan.participants:  # a dropped client fails mid-round: nothing comes back
            rng = runtime.generator(streams.train_seed(config.seed, r, c))
            update = algorithm.local_update(state.server, state.clients[c], data.clients[c], rng)
            state.clients[c] = update.state
            dirty.add(c)
            updates.append((update.payload, update.num_examples))
            trained.append((update.metrics, update.num_examples))
            up += payload_bytes(update.payload)
        state.server = algorithm.aggregate(state.server, updates)
        state.round = r
        evaluations = None
        if rounds.is_eval_round(config, r):
            evaluations = [
                algorithm.evaluate(
                    state.server,
                    state.clients[c],
                    data.clients[c],
                    runtime.generator(streams.eval_seed(config.seed, r, c)),
                )
                for c in range(data.num_clients)
            ]
        record = state.ledger.close(
            r,
            selected=len(plan.selected),
            trained=trained,
            traffic=Traffic(up, down, up, down),
            seconds=time.perf_counter() - start,
            evaluations=evaluations,
            evaluation_download=payload_bytes(state.server) * data.num_clients * bool(evaluations),
        )
        if checkpointer is not None and (
            r == config.rounds or (config.checkpoint_every and r % config.checkpoint_every == 0)
        ):
            checkpointer.save(state.snapshot(), dirty)
            dirty = set()
        if on_round is not None:
            on_round(record, r)
    return state
