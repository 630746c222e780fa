"""What a round is, independent of the transport: who takes part, with which random streams.

Both engines (in-process and Flower) draw participants and per-client generators from here, so
the same seed gives the same run on either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrir.algorithms.base import derive_seed
from fedrir.config import Config

# purposes of derived random streams: (seed, round, [client,] purpose)
SELECT, TRAIN, EVAL, INIT_SERVER, INIT_CLIENT = range(5)


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
    rng = np.random.default_rng(derive_seed(config.seed, round_, SELECT))
    base = max(1, int(num_clients * config.join_ratio))
    count = int(rng.integers(base, num_clients + 1)) if config.random_join else base
    selected = tuple(sorted(int(c) for c in rng.choice(num_clients, count, replace=False)))
    fails = rng.random(len(selected)) < config.dropout
    return RoundPlan(selected, frozenset(c for c, f in zip(selected, fails, strict=True) if f))


def train_seed(config: Config, round_: int, client: int) -> int:
    return derive_seed(config.seed, round_, client, TRAIN)


def eval_seed(config: Config, round_: int, client: int) -> int:
    return derive_seed(config.seed, round_, client, EVAL)


def server_seed(config: Config) -> int:
    return derive_seed(config.seed, 0, INIT_SERVER)


def client_seed(config: Config, client: int) -> int:
    return derive_seed(config.seed, 0, client, INIT_CLIENT)


def is_eval_round(config: Config, round_: int) -> bool:
    return round_ % config.eval_every == 0 or round_ == config.rounds
