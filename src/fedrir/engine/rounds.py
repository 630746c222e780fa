"""What a round is, independent of the transport: who takes part, with which random streams,
and what a client starts from.

Both engines (in-process and Flower) plan rounds and build initial states here, so the same seed
gives the same run on either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrir import streams
from fedrir.algorithms.base import Algorithm, Payload, State
from fedrir.config import Config
from fedrir.errors import ConfigError


@dataclass(frozen=True)
class RoundPlan:
    """The clients selected for a round, and those of them that drop out mid-round."""

    selected: tuple[int, ...]
    dropped: frozenset[int]

    @property
    def participants(self) -> tuple[int, ...]:
        return tuple(c for c in self.selected if c not in self.dropped)


def plan_round(config: Config, round_: int, num_clients: int) -> RoundPlan:
    """int(N · join_ratio) clients (at least 1), or a random count up to N with ``random_join``."""
    rng = np.random.default_rng(streams.select_seed(config.seed, round_))
    base = max(1, int(num_clients * config.join_ratio))
    count = int(rng.integers(base, num_clients + 1)) if config.random_join else base
    selected = tuple(sorted(int(c) for c in rng.choice(num_clients, count, replace=False)))
    fails = rng.random(len(selected)) < config.dropout
    return RoundPlan(selected, frozenset(c for c, f in zip(selected, fails, strict=True) if f))


def check_someone_trains(config: Config, num_clients: int) -> None:
    """Refuse a run in which, by its plan, no client ever trains (``dropout`` close to 1): its
    accuracies would be those of the initial models, reported as if the run had learned."""
    if config.dropout > 0 and not any(
        plan_round(config, r, num_clients).participants for r in range(1, config.rounds + 1)
    ):
        raise ConfigError(
            f"with dropout = {config.dropout}, no client trains in any of the {config.rounds} "
            "rounds of this run; lower --dropout"
        )


def is_eval_round(config: Config, round_: int) -> bool:
    return round_ % config.eval_every == 0 or round_ == config.rounds


def evaluated_clients(config: Config, round_: int, num_clients: int) -> tuple[int, ...]:
    """The clients an evaluation round evaluates: every one on the last round (and whenever
    ``eval_clients`` is 0 or at least the client count), else a seeded sample of that many."""
    count = config.eval_clients
    if round_ == config.rounds or not 0 < count < num_clients:
        return tuple(range(num_clients))
    rng = np.random.default_rng(streams.eval_sample_seed(config.seed, round_))
    return tuple(sorted(int(c) for c in rng.choice(num_clients, count, replace=False)))


def initial_server(algorithm: Algorithm) -> Payload:
    """The server's payload before round 1."""
    return algorithm.init_server(streams.server_seed(algorithm.config.seed))


def initial_client(algorithm: Algorithm, client: int, initial: Payload) -> State:
    """``client``'s private state before it first takes part: a function of the seed alone
    (``initial`` is :func:`initial_server`'s payload, computed once by the caller)."""
    return algorithm.init_client(streams.client_seed(algorithm.config.seed, client), initial)
