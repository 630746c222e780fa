"""The in-process simulator: the round loop, written once for every algorithm.

Per round: plan (who takes part), local updates on the broadcast payload, aggregation, and on
evaluation rounds personalized evaluation of every training client (or of a seeded sample, on
intermediate rounds with ``eval_clients``), on generalization rounds also the global model on them
and the new clients (adapted from their initial states, then thrown away), then the round is
closed (:mod:`.ledger`) and a checkpoint written. Everything that crosses between server and
clients goes through the :class:`~fedrir.engine.transport.Transport` (the codecs), as on Flower.
Clients' states go through the :class:`~fedrir.engine.store.ClientStore`: loaded when the round
touches a client, written back when they changed, never all in memory at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedrir.algorithms.base import Algorithm, Payload, payload_bytes
from fedrir.config import Config
from fedrir.data.types import FederatedData
from fedrir.engine import rounds
from fedrir.engine.checkpoint import Checkpointer, Snapshot
from fedrir.engine.ledger import Ledger, Traffic, check_aggregate, check_update
from fedrir.engine.store import ClientStore
from fedrir.engine.transport import Transport
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
    store, transport = state.clients, Transport(algorithm)
    while state.round < config.rounds:
        start = time.perf_counter()
        r = state.round + 1
        plan = rounds.plan_round(config, r, data.num_clients)
        sent = transport.broadcast(state.server, r)
        codec_seconds = sent.seconds
        updates, trained, up, raw_up = [], [], 0, 0
        for c in plan.participants:  # a dropped client fails mid-round: nothing comes back
            update, seconds = transport.train(sent.received, store.get(c), data.clients[c], r, c)
            upload, unpacking = transport.unpack(update.payload, sent.received)
            check_update(r, c, upload, update.metrics)
            store.put(c, update.state)
            codec_seconds += seconds + unpacking
            updates.append((upload, update.num_examples))
            trained.append((update.metrics, update.num_examples))
            up += payload_bytes(update.payload)
            raw_up += payload_bytes(upload)
        state.server = algorithm.aggregate(state.server, updates)
        check_aggregate(r, state.server)
        state.round = r
        evaluations, global_evaluations, new, evaluation_download = None, None, {}, 0
        if rounds.is_eval_round(config, r):
            shown = transport.broadcast(state.server, r, evaluation=True)
            codec_seconds += shown.seconds
            evaluated = rounds.evaluated_clients(config, r, data.num_clients)
            evaluations = {
                c: transport.evaluate(shown.received, store.get(c), data.clients[c], r, c)
                for c in evaluated
            }
            if rounds.is_generalization_round(config, r):
                global_evaluations = {
                    c: algorithm.evaluate_global(shown.received, data.clients[c]) for c in evaluated
                }
                new = {
                    c: rounds.evaluate_new_client(algorithm, shown.received, c, data.clients[c], r)
                    for c in rounds.new_clients(config, data.num_clients)
                }
            evaluation_download = payload_bytes(shown.encoded) * (len(evaluations) + len(new))
        down = payload_bytes(sent.encoded) * len(plan.selected)
        record = state.ledger.close(
            r,
            selected=len(plan.selected),
            trained=trained,
            traffic=Traffic(
                bytes_up=up,
                bytes_down=down,
                message_bytes_up=up,
                message_bytes_down=down,
                raw_bytes_up=raw_up,
                raw_bytes_down=payload_bytes(sent.received) * len(plan.selected),
                codec_seconds=codec_seconds,
            ),
            seconds=time.perf_counter() - start,
            evaluations=evaluations,
            evaluation_download=evaluation_download,
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
