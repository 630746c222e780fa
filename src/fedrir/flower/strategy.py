"""A Flower ``Strategy`` that delegates every decision to a fedrir ``Algorithm``.

Flower's ``Strategy.start`` runs the round loop (configure → send and receive → aggregate, for
training and then for evaluation); this class only translates between that loop and the algorithm
contract. Who trains follows :func:`fedrir.engine.rounds.plan_round` (partition ids mapped to node
ids), the server side is ``algorithm.aggregate``, and on evaluation rounds every training client
is evaluated (on generalization rounds also with the global model, and the new clients, which
adapt on their own nodes from the broadcast and keep nothing); payloads cross through the same
:class:`~fedrir.engine.transport.Transport` (codecs) and the round is closed by the same
:class:`~fedrir.engine.ledger.Ledger` as in the in-process engine. Updates are aggregated in
partition order so that the floating-point sums match that engine too.

Each message names the state file its client starts from; replies name the file written. At
checkpoint rounds the server's payload and these names go into the checkpoint, from which a
restarted ServerApp continues (``start_round``).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrir.algorithms.base import Algorithm, NewClientEvaluation, Payload, payload_bytes
from fedrir.engine import rounds
from fedrir.engine.checkpoint import Checkpointer
from fedrir.engine.ledger import Ledger, Traffic, check_aggregate, check_update
from fedrir.engine.transport import Broadcast, Transport
from fedrir.errors import FedrirError
from fedrir.flower.records import (
    evaluation_from,
    from_record,
    message_bytes,
    required_evaluation,
    to_record,
)
from fedrir.results import RoundRecord

# names of the records inside message contents, shared with the ClientApp
PAYLOAD_RECORD, CONFIG_RECORD, METRICS_RECORD = "payload", "config", "metrics"
NUM_EXAMPLES, CODEC_SECONDS = "num-examples", "codec-seconds"
REPLY_KEYS = (NUM_EXAMPLES, CODEC_SECONDS)
"""Metric-record keys of a training reply besides the training metrics."""
STATE_FILE, COMMITTED_FILE = "state-file", "committed-file"
"""Config-record keys: the file a client starts from (empty: its initial state; in a reply: the
file it wrote), and the one the last checkpoint names (which the client must keep)."""
GENERALIZE, NEW_CLIENT = "generalize", "new-client"
"""Config-record flags of an evaluate message: score the global model too (a training client on a
generalization round); this client is a new one (adapt from its initial state, keep nothing)."""
GLOBAL, ZERO_SHOT, ADAPTED, FULL = "global-", "zero-shot-", "adapted-", "full-"
"""Prefixes of the counts in evaluate replies besides the personalized ones (unprefixed)."""


@dataclass
class _Round:
    """What the strategy learns about the current round between Flower's calls."""

    start: float
    server: Payload
    sent: Broadcast
    selected: int
    bytes_down: int
    raw_bytes_down: int
    message_bytes_down: int
    codec_seconds: float
    traffic: Traffic = field(default_factory=Traffic)
    trained: list[tuple[dict[str, float], int]] = field(default_factory=list)
    evaluation_download: int = 0


def error_reason(reply: Message) -> str:
    """The one line a client's error reply says. Flower wraps a ClientApp's exception as
    ``<class 'T'>:<'message'>``, and its simulation engine puts a preamble before the message."""
    reason = reply.error.reason or ""
    match = re.fullmatch(r"<class '([\w.]+)'>:<'(.*)'>", reason, re.DOTALL)
    if match is not None:
        kind, reason = match.groups()
        preamble, _, message = reason.rpartition("occurred. Message: ")
        if preamble:  # the simulation engine's wrapper, which names no type
            reason = message
        elif not kind.startswith("fedrir."):  # not one of ours: say what it was
            reason = f"{kind.rsplit('.', 1)[-1]}: {reason}"
    lines = [line.strip() for line in reason.strip().splitlines()]
    return lines[-1] if lines else "no reason given"


class FedrirStrategy(Strategy):
    """Flower's round loop around a fedrir algorithm; ``ledger`` holds the run's totals and its
    evaluated rounds."""

    def __init__(
        self,
        algorithm: Algorithm,
        nodes: Mapping[int, int],
        on_round: Callable[[RoundRecord | None, int], None] | None = None,
        *,
        checkpointer: Checkpointer | None = None,
        ledger: Ledger | None = None,
        files: Mapping[int, str] | None = None,
        start_round: int = 0,
    ) -> None:
        """``nodes`` maps each client's partition id to the Flower node id that holds it. A
        resumed run passes the checkpoint's ledger, clients' files and round: Flower's rounds
        1, 2, … are then rounds ``start_round`` + 1, + 2, … of the run."""
        self.algorithm = algorithm
        self.config = algorithm.config
        self.transport = Transport(algorithm)
        self.nodes = dict(nodes)
        self.partition = {node: p for p, node in self.nodes.items()}
        self.on_round = on_round
        self.checkpointer = checkpointer
        self.ledger = ledger or Ledger()
        self.files = dict(files or {})
        self.committed = dict(self.files)
        self.offset = start_round
        self._round: _Round | None = None

    @property
    def current(self) -> _Round:
        assert self._round is not None, "configure_train opens every round"
        return self._round

    def summary(self) -> None:
        log(INFO, "\t├──> fedrir algorithm: %s", self.algorithm.name)
        log(INFO, "\t└──> clients (partition → node): %s", self.nodes)

    def _messages(
        self,
        grid: Grid,
        partitions: Iterable[int],
        arrays: ArrayRecord,
        kind: str,
        round_: int,
        flags: Mapping[str, bool] | None = None,
    ) -> list[Message]:
        """One message per partition whose node is still connected (a gone node gets none):
        the payload, the round, the client's state files, and ``flags``."""
        live = set(grid.get_node_ids())
        messages = []
        for p in partitions:
            if self.nodes[p] in live:
                named = {
                    STATE_FILE: self.files.get(p, ""),
                    COMMITTED_FILE: self.committed.get(p, ""),
                }
                content = RecordDict(
                    {
                        PAYLOAD_RECORD: arrays,
                        CONFIG_RECORD: ConfigRecord({"round": round_, **named, **(flags or {})}),
                    }
                )
                messages.append(
                    Message(
                        content, dst_node_id=self.nodes[p], message_type=kind, group_id=str(round_)
                    )
                )
            else:
                log(WARNING, "round %d: client %d (node %d) is gone", round_, p, self.nodes[p])
        return messages

    def _answers(self, replies: Iterable[Message], round_: int) -> list[tuple[int, Message]]:
        """The replies that carry content, by partition id. An error means that the client
        dropped out; the SuperLink sends it in the name of a node that left, from its own id."""
        answers = []
        for reply in replies:
            if reply.has_error():
                log(INFO, "round %d: a client took no part: %s", round_, error_reason(reply))
            else:
                answers.append((self.partition[reply.metadata.src_node_id], reply))
        return sorted(answers, key=lambda a: a[0])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        start = time.perf_counter()
        r = server_round + self.offset
        plan = rounds.plan_round(self.config, r, len(self.nodes))
        server = from_record(arrays, self.algorithm.runtime.device)
        sent = self.transport.broadcast(server, r)
        encoded = arrays if sent.encoded is server else to_record(sent.encoded)
        messages = self._messages(grid, plan.selected, encoded, MessageType.TRAIN, r)
        self._round = _Round(
            start,
            server,
            sent,
            len(plan.selected),
            bytes_down=payload_bytes(sent.encoded) * len(messages),
            raw_bytes_down=payload_bytes(server) * len(messages),
            message_bytes_down=message_bytes(messages),
            codec_seconds=sent.seconds,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        cur = self.current
        device = self.algorithm.runtime.device
        r = server_round + self.offset
        answers = self._answers(replies, r)
        updates, up = [], 0
        for p, m in answers:
            self.files[p] = str(m.content.config_records[CONFIG_RECORD][STATE_FILE])
            numbers = m.content.metric_records[METRICS_RECORD]
            n = int(numbers[NUM_EXAMPLES])  # type: ignore[arg-type]
            encoded = from_record(m.content.array_records[PAYLOAD_RECORD], device)
            upload, seconds = self.transport.unpack(encoded, cur.sent.received)
            metrics = {k: float(v) for k, v in numbers.items() if k not in REPLY_KEYS}  # type: ignore[arg-type]
            check_update(r, p, upload, metrics)
            cur.codec_seconds += seconds + float(numbers[CODEC_SECONDS])  # type: ignore[arg-type]
            up += payload_bytes(encoded)
            updates.append((upload, n))
            cur.trained.append((metrics, n))
        cur.server = self.algorithm.aggregate(cur.server, updates)
        check_aggregate(r, cur.server)
        cur.traffic = Traffic(
            bytes_up=up,
            bytes_down=cur.bytes_down,
            message_bytes_up=message_bytes(m for _, m in answers),
            message_bytes_down=cur.message_bytes_down,
            raw_bytes_up=sum(payload_bytes(p) for p, _ in updates),
            raw_bytes_down=cur.raw_bytes_down,
        )
        return to_record(cur.server), None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        r = server_round + self.offset
        if not rounds.is_eval_round(self.config, r):
            return []
        cur = self.current
        evaluated = rounds.evaluated_clients(self.config, r, len(self.nodes))
        shown = self.transport.broadcast(cur.server, r, evaluation=True)
        cur.codec_seconds += shown.seconds
        if shown.encoded is not cur.server:
            arrays = to_record(shown.encoded)
        kind = MessageType.EVALUATE
        if rounds.is_generalization_round(self.config, r):
            new = rounds.new_clients(self.config, len(self.nodes))
            messages = self._messages(grid, evaluated, arrays, kind, r, {GENERALIZE: True})
            messages += self._messages(grid, new, arrays, kind, r, {NEW_CLIENT: True})
        else:
            messages = self._messages(grid, evaluated, arrays, kind, r)
        cur.evaluation_download = payload_bytes(shown.encoded) * len(messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Closes the round (Flower calls it every round): counters, and the record if evaluated."""
        cur, r = self.current, server_round + self.offset
        evaluations, global_evaluations, new = None, None, {}
        if rounds.is_eval_round(self.config, r):
            held = set(rounds.new_clients(self.config, len(self.nodes)))
            answers = [
                (p, m.content.metric_records[METRICS_RECORD]) for p, m in self._answers(replies, r)
            ]
            trained = [(p, m) for p, m in answers if p not in held]
            evaluations = {p: required_evaluation(m, "") for p, m in trained}
            if not evaluations:
                raise FedrirError(f"round {r}: no client answered the evaluation")
            if rounds.is_generalization_round(self.config, r):
                global_evaluations = {p: evaluation_from(m, GLOBAL) for p, m in trained}
                new = {
                    p: NewClientEvaluation(
                        zero_shot=evaluation_from(m, ZERO_SHOT),
                        adapted=required_evaluation(m, ADAPTED),
                        full=evaluation_from(m, FULL),
                    )
                    for p, m in answers
                    if p in held
                }
        record = self.ledger.close(
            r,
            selected=cur.selected,
            trained=cur.trained,
            traffic=dataclasses.replace(cur.traffic, codec_seconds=cur.codec_seconds),
            seconds=time.perf_counter() - cur.start,
            evaluations=evaluations,
            evaluation_download=cur.evaluation_download,
            global_evaluations=global_evaluations,
            new_clients=new,
        )
        config = self.config
        if self.checkpointer is not None and (
            r == config.rounds or (config.checkpoint_every and r % config.checkpoint_every == 0)
        ):
            history = [rec.to_json() for rec in self.ledger.history]
            self.checkpointer.save(r, cur.server, self.files, history, self.ledger.counters())
            self.committed = dict(self.files)
        if self.on_round is not None:
            self.on_round(record, r)
        if record is None:
            return None
        return MetricRecord({"accuracy": record.accuracy, "loss": record.loss})
