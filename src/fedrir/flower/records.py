"""Payloads and client states as Flower ``ArrayRecord``s, and bytes counted from Flower messages.

A fedrir ``Payload`` or ``State`` is a ``dict[str, Tensor]``; an ``ArrayRecord`` is Flower's
``dict[str, Array]`` (each array serialized with ``np.save``). The conversion is exact, so a
payload that crosses the Flower transport is bit-for-bit the one the in-process engine hands over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, Message

from fedrir.algorithms.base import Payload


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors (on any device, any memory format) → an ArrayRecord, keys and order kept."""
    return ArrayRecord(torch_state_dict=dict(tensors))


def from_record(record: ArrayRecord, device: torch.device) -> Payload:
    """An ArrayRecord → tensors on ``device`` (used for payloads and client states alike)."""
    return {key: torch.from_numpy(array.numpy()).to(device) for key, array in record.items()}


def message_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the ArrayRecords the messages carry: serialized arrays and their keys, as
    Flower's ``ArrayRecord.count_bytes`` reports them. Error replies carry none."""
    return sum(
        record.count_bytes()
        for message in messages
        if message.has_content()
        for record in message.content.array_records.values()
    )
