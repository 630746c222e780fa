"""Random streams: every seed a run uses, derived from the run's seed in one place.

A stream is named by integers (seed, round, [client,] purpose), so any engine, on any machine,
derives the same generator for the same step. Algorithms never derive seeds: they use the seed or
generator they are handed.
"""

from __future__ import annotations

import numpy as np

(SELECT, TRAIN, EVAL, INIT_SERVER, INIT_CLIENT, EVAL_SAMPLE, UPLINK, DOWNLINK, HOLD_OUT, ADAPT) = (
    range(10)
)
"""Purposes of the derived streams."""


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (seed, round, client, purpose, …), order-sensitive."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint64)[0] >> 1)


def select_seed(seed: int, round_: int) -> int:
    """Who takes part in ``round_`` (and who drops out)."""
    return derive_seed(seed, round_, SELECT)


def eval_sample_seed(seed: int, round_: int) -> int:
    """Which clients an intermediate evaluation round evaluates (``eval_clients`` > 0)."""
    return derive_seed(seed, round_, EVAL_SAMPLE)


def hold_out_seed(seed: int) -> int:
    """Which clients are held out of training as new clients (``new_clients`` > 0)."""
    return derive_seed(seed, 0, HOLD_OUT)


def adapt_seed(seed: int, round_: int, client: int) -> int:
    """A new client's adaptation and scoring on ``round_``."""
    return derive_seed(seed, round_, client, ADAPT)


def train_seed(seed: int, round_: int, client: int) -> int:
    return derive_seed(seed, round_, client, TRAIN)


def eval_seed(seed: int, round_: int, client: int) -> int:
    return derive_seed(seed, round_, client, EVAL)


def server_seed(seed: int) -> int:
    """The server's initial payload."""
    return derive_seed(seed, 0, INIT_SERVER)


def client_seed(seed: int, client: int) -> int:
    """A client's initial private state."""
    return derive_seed(seed, 0, client, INIT_CLIENT)


def uplink_seed(seed: int, round_: int, client: int) -> int:
    """The uplink codec's randomness (stochastic quantization) for ``client``'s update."""
    return derive_seed(seed, round_, client, UPLINK)


def downlink_seed(seed: int, round_: int, evaluation: bool) -> int:
    """The downlink codec's randomness for ``round_``'s broadcast (one message for every client
    it reaches): to train, or, with ``evaluation``, to evaluate after aggregation."""
    return derive_seed(seed, round_, int(evaluation), DOWNLINK)
