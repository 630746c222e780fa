"""The in-process simulator: the round loop, written once for every algorithm.

Per round: plan (who takes part), local updates on the broadcast payload, aggregation, and on
evaluation rounds personalized evaluation of every training client (or of a seeded sample, on
intermediate rounds with ``eval_clients``), on generalization rounds also the global model on them
and the new clients (adapted from their initial states, then thrown away), then the round is
closed (:mod:`.ledger`) and a checkpoint written.
Clients' states go through the :class:`~fedrir.engine.store.ClientStore`: loaded when the round
touches a client, written back when they changed, never all in memory at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedrir import streams
from fedrir.algorithms.base import Algorithm, Payload, payload_bytes
from fedrir.config import Config
from fedrir.data.types import FederatedData
from fedrir.engine import rounds
from fedrir.engine.checkpoint import Checkpointer, Snapshot
from fedrir.engine.ledger import Ledger, Traffic, check_aggregate, check_update
from fedrir.engine.store import ClientStore
from fedrir.results import RoundRecord


@dataclass
class SimState:
    """Everything the loop carries from one round to the next (and into checkpoints)."""

    round: int
    server: Payload
    clients: ClientStore
    ledger: Ledger = field(default_factory=Ledger)


def open_state(
    algorithm: Algorithm, folder: Path, budget_bytes: int, snapshot: Snapshot | None = None
) -> SimState:
    """The loop's state at round 0, or where ``snapshot`` left off, with the clients' store in
    ``folder`` (at most ``budget_bytes`` of states in memory)."""
    initial = rounds.initial_server(algorithm)
    store = ClientStore(
        folder,
        budget_bytes,
        lambda c: rounds.initial_client(algorithm, c, initial),
        algorithm.runtime.device,
        None if snapshot is None else snapshot.clients,
    )
    if snapshot is None:
        return SimState(0, initial, store)
    ledger = Ledger.restore(snapshot.history, snapshot.counters)
    return SimState(snapshot.round, snapshot.server, store, ledger)


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
    runtime, store = algorithm.runtime, state.clients
    while state.round < config.rounds:
        start = time.perf_counter()
        r = state.round + 1
        plan = rounds.plan_round(config, r, data.num_clients)
        down = payload_bytes(state.server) * len(plan.selected)
        updates, trained, up = [], [], 0
        for c in plan.participants:  # a dropped client fails mid-round: nothing comes back
            rng = runtime.generator(streams.train_seed(config.seed, r, c))
            update = algorithm.local_update(state.server, store.get(c), data.clients[c], rng)
            check_update(r, c, update.payload, update.metrics)
            store.put(c, update.state)
            updates.append((update.payload, update.num_examples))
            trained.append((update.metrics, update.num_examples))
            up += payload_bytes(update.payload)
        state.server = algorithm.aggregate(state.server, updates)
        check_aggregate(r, state.server)
        state.round = r
        evaluations, global_evaluations, new = None, None, {}
        if rounds.is_eval_round(config, r):
            evaluated = rounds.evaluated_clients(config, r, data.num_clients)
            evaluations = {
                c: algorithm.evaluate(
                    state.server,
                    store.get(c),
                    data.clients[c],
                    runtime.generator(streams.eval_seed(config.seed, r, c)),
                )
                for c in evaluated
            }
        if rounds.is_generalization_round(config, r):
            global_evaluations = {
                c: algorithm.evaluate_global(state.server, data.clients[c]) for c in evaluated
            }
            new = {
                c: rounds.evaluate_new_client(algorithm, state.server, c, data.clients[c], r)
                for c in rounds.new_clients(config, data.num_clients)
            }
        record = state.ledger.close(
            r,
            selected=len(plan.selected),
            trained=trained,
            traffic=Traffic(up, down, up, down),
            seconds=time.perf_counter() - start,
            evaluations=evaluations,
            evaluation_download=payload_bytes(state.server) * (len(evaluations or ()) + len(new)),
            global_evaluations=global_evaluations,
            new_clients=new,
        )
        if checkpointer is not None and (
            r == config.rounds or (config.checkpoint_every and r % config.checkpoint_every == 0)
        ):
            history = [rec.to_json() for rec in state.ledger.history]
            files = store.flush()
            checkpointer.save(r, state.server, files, history, state.ledger.counters())
            store.commit(files)  # the manifest naming `files` is durable: older files can go
        if on_round is not None:
            on_round(record, r)
    return state
