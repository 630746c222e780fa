"""Codecs at the transport boundary, the same for both engines (the in-process loop and Flower).

What crosses the boundary, each way:

- **down**: the server encodes its payload once per broadcast with the ``downlink`` codec; every
  client it reaches decodes the same message to the same tensors (:attr:`Broadcast.received`),
  which are what the algorithm trains or evaluates on. Top-k is refused on the downlink (see
  :mod:`fedrir.config`): a broadcast is the whole model, not an update, so dropping 99 % of it
  would zero the weights; casts and quantizers apply to the weights themselves.
- **up**: a client's upload travels as its *update*, the upload minus what it received, for every
  float tensor whose key, dtype and shape the broadcast also has (any other tensor, e.g. FedProto's
  prototypes or a key the server did not send, is encoded as it is). The server decodes and adds
  back what it broadcast before aggregation. Top-k's error feedback (what was not sent) is kept in
  the client's private state under the reserved prefix :data:`RESIDUAL`, added and removed here:
  the algorithm never sees it, the client store writes it with the rest of the state, so it is
  checkpointed and resumes exactly.

Codecs encode the float tensors of two or more dimensions (weight matrices and kernels: 99.8 % of
the baselines' and FedRIR's shared entries); vectors and scalars (biases, normalization weights and
statistics) travel as they are, under the prefix :data:`RAW`, as PowerSGD (Vogels et al., NeurIPS
2019) and Deep Gradient Compression (Lin et al., ICLR 2018) leave them: they cost next to nothing,
and a quantized BatchNorm variance can turn negative (NaN losses, measured with ``int8`` down).

Stochastic codecs draw from generators derived from the run's seed (:mod:`fedrir.streams`) per
(round, client, direction), so the same seed gives the same run on either engine. With ``none``
both ways, every tensor is handed over as it is, bit for bit, as before codecs existed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fedrir import streams
from fedrir.algorithms.base import Algorithm, Evaluation, Payload, State, Update
from fedrir.data.types import ClientData
from fedrir.engine.codecs import Codec, Tensors, parse_codec

RESIDUAL = "@uplink-residual/"
"""Prefix of the uplink codec's error-feedback residual in a client's private state."""
RAW = "@raw/"
"""Prefix, in an encoded message, of a tensor the codec left as it is (see the module doc)."""


@dataclass(frozen=True)
class Broadcast:
    """One message from the server to the clients it reaches."""

    encoded: Payload
    """What travels (its bytes are what is counted)."""
    received: Payload
    """What every client decodes it to."""
    seconds: float


def split_state(state: State) -> tuple[State, Tensors | None]:
    """A stored client state → the algorithm's part, and the residual (None when there is none)."""
    if not any(k.startswith(RESIDUAL) for k in state):
        return state, None
    inner = {k: v for k, v in state.items() if not k.startswith(RESIDUAL)}
    residual = {k.removeprefix(RESIDUAL): v for k, v in state.items() if k.startswith(RESIDUAL)}
    return inner, residual


def join_state(state: State, residual: Tensors | None) -> State:
    """The state to store: the algorithm's part and the residual under :data:`RESIDUAL`."""
    if not residual:
        return state
    return {**state, **{RESIDUAL + k: v for k, v in residual.items()}}


def _coded(t: torch.Tensor) -> bool:
    """Whether a codec encodes ``t`` (a float tensor of two or more dimensions)."""
    return t.is_floating_point() and t.dim() >= 2


def _encode(
    codec: Codec, tensors: Payload, rng: torch.Generator, residual: Tensors | None
) -> tuple[Payload, Tensors | None]:
    """The message: the tensors :func:`_coded` selects through ``codec``, the rest as they are.
    They are encoded in the order of their keys, so that the random draws do not depend on the
    order a payload came in (a checkpoint's server payload comes back sorted by key)."""
    coded = {k: tensors[k] for k in sorted(tensors) if _coded(tensors[k])}
    encoded, rest = codec.encode(coded, rng, residual)
    raw = {RAW + k: t for k, t in tensors.items() if not _coded(t)}
    return raw | encoded, rest


def _decode(codec: Codec, message: Payload) -> Payload:
    raw = {k.removeprefix(RAW): t for k, t in message.items() if k.startswith(RAW)}
    return raw | codec.decode({k: t for k, t in message.items() if not k.startswith(RAW)})


def _relative(t: torch.Tensor, base: torch.Tensor | None) -> bool:
    """Whether ``t`` travels as its difference from ``base`` (what the client received)."""
    return (
        base is not None
        and t.is_floating_point()
        and base.dtype == t.dtype
        and base.shape == t.shape
    )


class Transport:
    """The run's two codecs, and the client's and the server's sides of every exchange."""

    def __init__(self, algorithm: Algorithm) -> None:
        self.algorithm = algorithm
        self.seed = algorithm.config.seed
        self.uplink = parse_codec(algorithm.config.uplink)
        self.downlink = parse_codec(algorithm.config.downlink)

    def _generator(self, seed: int) -> torch.Generator:
        return self.algorithm.runtime.generator(seed)

    # --- server side -----------------------------------------------------------------------

    def broadcast(self, server: Payload, round_: int, *, evaluation: bool = False) -> Broadcast:
        """``server`` encoded for ``round_``'s training (or, with ``evaluation``, for the
        evaluation after its aggregation), and what clients decode it to."""
        if self.downlink.values is None:
            return Broadcast(server, server, 0.0)
        start = time.perf_counter()
        rng = self._generator(streams.downlink_seed(self.seed, round_, evaluation))
        encoded, _ = _encode(self.downlink, server, rng, None)
        received = _decode(self.downlink, encoded)
        return Broadcast(encoded, received, time.perf_counter() - start)

    def unpack(self, encoded: Payload, received: Payload) -> tuple[Payload, float]:
        """A client's upload as the algorithm made it (up to the codec's loss), from its encoded
        update and what the client had received; and the seconds it took."""
        if self.uplink.values is None:
            return encoded, 0.0
        start = time.perf_counter()
        decoded = _decode(self.uplink, encoded)
        upload = {
            k: received[k] + t if _relative(t, received.get(k)) else t for k, t in decoded.items()
        }
        return upload, time.perf_counter() - start

    # --- client side -----------------------------------------------------------------------

    def receive(self, encoded: Payload) -> tuple[Payload, float]:
        """What a client decodes a broadcast to (as :meth:`broadcast` computed for the server)."""
        if self.downlink.values is None:
            return encoded, 0.0
        start = time.perf_counter()
        received = _decode(self.downlink, encoded)
        return received, time.perf_counter() - start

    def train(
        self, received: Payload, state: State, data: ClientData, round_: int, client: int
    ) -> tuple[Update, float]:
        """``client``'s local update on what it received, its upload encoded as an update
        (``Update.payload`` is what travels, ``Update.state`` the state to store, residual
        included); and the seconds the codec took."""
        inner, residual = split_state(state)
        rng = self._generator(streams.train_seed(self.seed, round_, client))
        update = self.algorithm.local_update(received, inner, data, rng)
        if self.uplink.values is None:
            return update, 0.0
        start = time.perf_counter()
        delta = {
            k: t - received[k] if _relative(t, received.get(k)) else t
            for k, t in update.payload.items()
        }
        previous = None
        if residual is not None:  # zeros for a tensor not uploaded before
            previous = {
                k: residual[k] if k in residual else torch.zeros_like(t)
                for k, t in delta.items()
                if _coded(t)
            }
        rng = self._generator(streams.uplink_seed(self.seed, round_, client))
        encoded, rest = _encode(self.uplink, delta, rng, previous)
        kept = None if rest is None else {**(residual or {}), **rest}
        sent = Update(encoded, update.num_examples, join_state(update.state, kept), update.metrics)
        return sent, time.perf_counter() - start

    def evaluate(
        self, received: Payload, state: State, data: ClientData, round_: int, client: int
    ) -> Evaluation:
        """``client``'s personalized evaluation on what it received."""
        inner, _ = split_state(state)
        rng = self._generator(streams.eval_seed(self.seed, round_, client))
        return self.algorithm.evaluate(received, inner, data, rng)
