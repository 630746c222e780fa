"""Closing a round, written once for both engines.

Whatever carried the round (the in-process loop or Flower's messages), it ends the same way: the
round's numbers (who took part, bytes each way, seconds, training metrics) are added to the run's
totals and, on evaluation rounds, pooled with the clients' evaluations into a
:class:`~fedrir.results.RoundRecord`. A new field or rule of the records is added here only.

A run that diverges stops here too, at the first non-finite number (a client's training loss,
its upload, the aggregate, an evaluation loss): one line naming the round, the client and the
quantity, before anything of that round is recorded, so the last checkpoint stays the last good
one and no result file ever holds a NaN.

Bytes come in three kinds, named apart: ``bytes_*`` are the tensor bytes of the encoded payloads
handed over (every part a codec sends: values, indices, scales, headers; the same on either
engine), ``raw_bytes_*`` those of the payloads before encoding (equal to ``bytes_*`` with the
``none`` codec), and ``message_bytes_*`` what the transport actually carried (Flower: the serialized
messages; in-process, where nothing is serialized, the encoded tensor bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from fedrir.algorithms.base import Evaluation, NewClientEvaluation, Payload
from fedrir.errors import Diverged
from fedrir.results import RoundRecord, generalization, pooled, weighted_metrics


@dataclass(frozen=True)
class Traffic:
    """Bytes one round moved each way (encoded, before encoding, and the transport's messages),
    and the seconds its codecs took."""

    bytes_up: int = 0
    bytes_down: int = 0
    message_bytes_up: int = 0
    message_bytes_down: int = 0
    raw_bytes_up: int = 0
    raw_bytes_down: int = 0
    codec_seconds: float = 0.0


@dataclass
class Ledger:
    """A run's running totals and its evaluated rounds; what a checkpoint carries of them."""

    history: list[RoundRecord] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    message_bytes_up: int = 0
    message_bytes_down: int = 0
    raw_bytes_up: int = 0
    raw_bytes_down: int = 0
    codec_seconds: float = 0.0
    bytes_evaluation_downloaded: int = 0
    seconds: float = 0.0

    def close(
        self,
        round_: int,
        *,
        selected: int,
        trained: Sequence[tuple[Mapping[str, float], int]],
        traffic: Traffic,
        seconds: float,
        evaluations: Mapping[int, Evaluation] | None,
        evaluation_download: int = 0,
        global_evaluations: Mapping[int, Evaluation | None] | None = None,
        new_clients: Mapping[int, NewClientEvaluation] | None = None,
    ) -> RoundRecord | None:
        """Add round ``round_`` to the totals; its record if it was evaluated (``evaluations``:
        each evaluated client's counts by id; ``evaluation_download``: the tensor bytes sent for
        them and for the new clients). On generalization rounds, ``global_evaluations`` holds the
        global model's counts on the evaluated clients and ``new_clients`` the new clients'."""
        for f in fields(Traffic):
            setattr(self, f.name, getattr(self, f.name) + getattr(traffic, f.name))
        self.bytes_evaluation_downloaded += evaluation_download
        self.seconds += seconds
        if evaluations is None:
            return None
        for c, e in sorted(evaluations.items()):
            if not math.isfinite(e.loss_sum):
                raise diverged(round_, f"client {c}'s evaluation loss is {e.loss_sum}")
        record = RoundRecord(
            round=round_,
            participants=len(trained),
            selected=selected,
            evaluated=len(evaluations),
            bytes_up=traffic.bytes_up,
            bytes_down=traffic.bytes_down,
            message_bytes_up=traffic.message_bytes_up,
            message_bytes_down=traffic.message_bytes_down,
            raw_bytes_up=traffic.raw_bytes_up,
            raw_bytes_down=traffic.raw_bytes_down,
            compression_up=ratio(traffic.raw_bytes_up, traffic.bytes_up),
            compression_down=ratio(traffic.raw_bytes_down, traffic.bytes_down),
            codec_seconds=traffic.codec_seconds,
            bytes_up_total=self.bytes_up,
            bytes_down_total=self.bytes_down,
            seconds=seconds,
            elapsed=self.seconds,
            train=weighted_metrics(trained),
            **pooled(evaluations),
            **(
                {}
                if global_evaluations is None
                else generalization(global_evaluations, new_clients or {})
            ),
        )
        self.history.append(record)
        return record

    def counters(self) -> dict[str, Any]:
        """The totals, as a checkpoint stores them."""
        return {name: getattr(self, name) for name in COUNTERS}

    @classmethod
    def restore(cls, history: Sequence[Mapping[str, Any]], counters: Mapping[str, Any]) -> Ledger:
        """The ledger a checkpoint holds; one written before codecs were wired sent everything
        as it was (raw bytes = bytes, no codec time)."""
        ledger = cls(history=[RoundRecord(**_as_sent(r)) for r in history])
        before = {"raw_bytes_up": "bytes_up", "raw_bytes_down": "bytes_down"}
        for name in COUNTERS:
            value = counters.get(name, counters.get(before.get(name, ""), 0))
            setattr(ledger, name, type(getattr(ledger, name))(value))
        return ledger


def _as_sent(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record``, with the codec fields of a round whose payloads went as they were if it
    has none (written before codecs were wired)."""
    sent = {
        "raw_bytes_up": record["bytes_up"],
        "raw_bytes_down": record["bytes_down"],
        "compression_up": 1.0,
        "compression_down": 1.0,
        "codec_seconds": 0.0,
    }
    return sent | dict(record)


def ratio(raw: int, encoded: int) -> float:
    """How many times fewer bytes the codec sent (1.0 when nothing was sent)."""
    return raw / encoded if encoded else 1.0


def diverged(round_: int, what: str) -> Diverged:
    return Diverged(
        round_,
        f"the run diverged in round {round_}: {what}; the last checkpoint is kept; start a new "
        "run with a lower --lr",
    )


def _first_non_finite(tensors: Payload) -> str | None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_update(round_: int, client: int, payload: Payload, metrics: Mapping[str, float]) -> None:
    """Stop the run if what ``client`` reports for ``round_`` holds a non-finite number."""
    for key, value in sorted(metrics.items()):
        if not math.isfinite(value):
            raise diverged(round_, f"client {client}'s training {key} is {value}")
    name = _first_non_finite(payload)
    if name is not None:
        raise diverged(round_, f"client {client}'s upload {name!r} holds non-finite values")


def check_aggregate(round_: int, server: Payload) -> None:
    """Stop the run if the server's aggregate after ``round_`` holds a non-finite number."""
    name = _first_non_finite(server)
    if name is not None:
        raise diverged(round_, f"the aggregate {name!r} holds non-finite values")


COUNTERS = tuple(f.name for f in fields(Ledger) if f.name != "history")
"""The running totals a checkpoint carries besides the history."""
BEFORE_CODECS = frozenset({"raw_bytes_up", "raw_bytes_down", "codec_seconds"})
"""The counters that a checkpoint written before codecs were wired lacks (restore fills them in)."""
RECORD_BEFORE_CODECS = BEFORE_CODECS | {"compression_up", "compression_down"}
"""The record fields such a checkpoint's history lacks (:func:`_as_sent` fills them in)."""
