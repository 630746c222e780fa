"""Payloads and client states as Flower ``ArrayRecord``s, and bytes counted from Flower messages.

A fedrir ``Payload`` or ``State`` is a ``dict[str, Tensor]``; an ``ArrayRecord`` is Flower's
``dict[str, Array]`` (each array serialized with ``np.save``). The conversion is exact, so a
payload that crosses the Flower transport is bit-for-bit the one the in-process engine hands over.
NumPy has no bfloat16 (the ``bf16`` codec's values): such a tensor travels as its 16-bit patterns
(int16) in an Array whose ``dtype`` says ``bfloat16``, and is viewed back on arrival.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedrir.algorithms.base import Evaluation, Payload
from fedrir.errors import FedrirError

BFLOAT16 = "bfloat16"


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors (on any device, any memory format) → an ArrayRecord, keys and order kept."""
    return ArrayRecord({key: _array(t) for key, t in tensors.items()})


def _array(t: torch.Tensor) -> Array:
    if t.dtype != torch.bfloat16:
        return Array.from_numpy_ndarray(t.detach().cpu().numpy())
    array = Array.from_numpy_ndarray(t.detach().cpu().view(torch.int16).numpy())
    array.dtype = BFLOAT16
    return array


def from_record(record: ArrayRecord, device: torch.device) -> Payload:
    """An ArrayRecord → tensors on ``device`` (used for payloads and client states alike)."""
    return {key: _tensor(array).to(device) for key, array in record.items()}


def _tensor(array: Array) -> torch.Tensor:
    t = torch.from_numpy(array.numpy())
    return t.view(torch.bfloat16) if array.dtype == BFLOAT16 else t


def evaluation_metrics(prefix: str, evaluation: Evaluation | None) -> dict[str, int | float]:
    """An evaluation's counts as metric entries named ``<prefix>correct``, ``…total`` and
    ``…loss-sum``; none for None (n/a)."""
    if evaluation is None:
        return {}
    return {
        f"{prefix}correct": evaluation.correct,
        f"{prefix}total": evaluation.total,
        f"{prefix}loss-sum": evaluation.loss_sum,
    }


def evaluation_from(metrics: MetricRecord, prefix: str) -> Evaluation | None:
    """What :func:`evaluation_metrics` wrote under ``prefix`` (None if it wrote nothing)."""
    if f"{prefix}correct" not in metrics:
        return None
    return Evaluation(
        correct=int(metrics[f"{prefix}correct"]),  # type: ignore[arg-type]
        total=int(metrics[f"{prefix}total"]),  # type: ignore[arg-type]
        loss_sum=float(metrics[f"{prefix}loss-sum"]),  # type: ignore[arg-type]
    )


def required_evaluation(metrics: MetricRecord, prefix: str) -> Evaluation:
    """:func:`evaluation_from`, for counts every reply of its kind carries."""
    evaluation = evaluation_from(metrics, prefix)
    if evaluation is None:
        raise FedrirError(f"an evaluate reply has no {prefix or 'personalized '}counts")
    return evaluation


def message_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the ArrayRecords the messages carry: serialized arrays and their keys, as
    Flower's ``ArrayRecord.count_bytes`` reports them. Error replies carry none."""
    return sum(
        record.count_bytes()
        for message in messages
        if message.has_content()
        for record in message.content.array_records.values()
    )
