"""The fedrir ServerApp and ClientApp: the same algorithm objects, carried by Flower messages.

``flwr run .`` (simulation or deployment) loads :data:`server_app` and :data:`client_app`, named in
``[tool.flwr.app.components]``. The fedrir configuration travels as Flower's run config: every
config key by its flat name (``rounds``, ``clients``, ``mask_ratio``…), plus settings of the app
itself (:data:`APP_SETTINGS`). Each SuperNode holds one client, picked by its node config
``partition-id``; the split is the one the run config defines, so every node computes the same.

A client's private state lives in files on its node (:class:`~fedrir.engine.store.NodeStore`, in
the node config's ``state-dir``, else the run config's, else a folder named after the run's
settings under the system's temporary folder), never in Flower's ``context.state``: every message
names the file the client starts from (``state-file``, empty for its initial state), the client
answers with the file it wrote, and the server's checkpoint names those files. So neither a node
nor Flower's simulation grows with the rounds, and a restarted ServerApp or SuperNode continues
from the checkpointed states.

Messages:
- ``query``: the server asks each node which client it holds (and the input shape and classes);
- ``train``: payload + round + state file → upload + sample count + training metrics + codec
  seconds + new file;
- ``evaluate``: payload + round + state file → correct / total / loss sum on its evaluation set
  (with ``generalize``: the global model's too); with ``new-client``, the client is a new one: it
  adapts from its initial state and answers zero-shot, adapted (and full) counts, keeping nothing.

Payloads travel encoded by the run's codecs both ways (:class:`~fedrir.engine.transport.Transport`,
the same code as the in-process engine's): the broadcast by ``downlink``, the upload as an update
by ``uplink``, its error-feedback residual kept in the client's state file.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    UserConfigValue,
)
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from fedrir import runs
from fedrir.algorithms import get_algorithm
from fedrir.algorithms.base import Algorithm, State, Task
from fedrir.config import KEYS, Config, flat_value, run_identity, with_overrides
from fedrir.data.types import ClientData, FederatedData
from fedrir.engine import rounds
from fedrir.engine.checkpoint import Checkpointer, check_setting
from fedrir.engine.ledger import Ledger
from fedrir.engine.runtime import resolve_runtime, torch_threads
from fedrir.engine.store import NodeStore
from fedrir.engine.transport import Transport
from fedrir.errors import ConfigError, FedrirError
from fedrir.flower.records import evaluation_metrics, from_record, to_record
from fedrir.flower.strategy import (
    ADAPTED,
    CODEC_SECONDS,
    COMMITTED_FILE,
    CONFIG_RECORD,
    FULL,
    GENERALIZE,
    GLOBAL,
    METRICS_RECORD,
    NEW_CLIENT,
    NUM_EXAMPLES,
    PAYLOAD_RECORD,
    STATE_FILE,
    ZERO_SHOT,
    FedrirStrategy,
    error_reason,
)
from fedrir.results import RoundRecord
from fedrir.runs import RunResult

APP_SETTINGS: dict[str, UserConfigValue] = {
    "out-dir": "",
    "timeout": 600.0,
    "state-dir": "",
    "resume": False,
}
"""Run-config keys of the app, not of the fedrir config: where the ServerApp writes its files
(empty: a new folder under ``runs/`` of its working directory), how many seconds it waits for the
SuperNodes to connect and, in a round, for the next reply (a round lasts as long as replies keep
coming), where clients keep their states (a node's own ``state-dir`` in its node config comes
first), and whether to continue the run in ``out-dir`` from its checkpoint."""

RUN_KEYS = tuple(k for k in KEYS if k != "engine")
"""The fedrir keys in the run config (``engine`` is ``flower`` by definition here)."""

INFO_RECORD = "info"
DROPPED_OUT = 100
"""Error code of a reply from a client that drops out of a round (``dropout`` > 0)."""

ConfigSource = Callable[[Context], Config]


def to_run_config(config: Config) -> dict[str, UserConfigValue]:
    """``config`` as a Flower run config: each key by its flat name."""
    return {name: flat_value(config, name) for name in RUN_KEYS}


def config_from_run_config(run_config: Mapping[str, UserConfigValue]) -> Config:
    """The fedrir config a Flower run config describes; unknown keys are errors."""
    unknown = sorted(set(run_config) - set(RUN_KEYS) - set(APP_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown run-config keys {unknown}; known: {', '.join(RUN_KEYS)}")
    values = {k: v for k, v in run_config.items() if k in RUN_KEYS}
    return with_overrides(Config(engine="flower"), values)


def config_from_context(context: Context) -> Config:
    return config_from_run_config(context.run_config)


# ----------------------------------------------------------------------------- client side


@functools.lru_cache(maxsize=1)
def _prepared(config: Config) -> tuple[Algorithm, FederatedData]:
    """One workspace and one copy of the data per process: a simulation worker serves many
    nodes, one message after another."""
    return runs.prepare(config)


def _partition(context: Context) -> int:
    """The client this node holds, from its ``--node-config``."""
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            "this SuperNode has no integer partition-id; start it with --node-config "
            "'partition-id=<i> num-partitions=<n>'"
        ) from None


def _client(context: Context, load: ConfigSource) -> tuple[Config, Algorithm, ClientData, int]:
    config = load(context)
    algorithm, data = _prepared(config)
    partition = _partition(context)
    if not 0 <= partition < data.num_clients:
        raise FedrirError(
            f"this node holds partition {partition}, but the run has {data.num_clients} clients"
        )
    return config, algorithm, data.clients[partition], partition


@functools.lru_cache(maxsize=4)
def _node_store(folder: Path, budget: int, device: str) -> NodeStore:
    """One store per state folder and process, so its cache serves message after message."""
    return NodeStore(folder, budget, torch.device(device))


def _store(
    context: Context, config: Config, algorithm: Algorithm, fallback: Path | None
) -> NodeStore:
    """The node's store: its node config's ``state-dir``, else the run config's, else
    ``fallback``, else a folder named after the run's settings in the temporary folder."""
    chosen = str(context.node_config.get("state-dir") or context.run_config.get("state-dir") or "")
    folder = Path(chosen) if chosen else fallback
    if folder is None:
        folder = Path(tempfile.gettempdir()) / "fedrir-states" / run_identity(config)[:16]
    return _node_store(folder, config.state_cache_mb * 2**20, str(algorithm.runtime.device))


def _state(store: NodeStore, algorithm: Algorithm, partition: int, message: Message) -> State:
    """The state the server named for this client, or its seeded initial state."""
    name = str(message.content.config_records[CONFIG_RECORD][STATE_FILE])
    if name:
        return store.load(partition, name)
    return rounds.initial_client(algorithm, partition, rounds.initial_server(algorithm))


def make_client_app(
    load: ConfigSource = config_from_context, state_dir: Path | None = None
) -> ClientApp:
    """The ClientApp; ``load`` reads the fedrir config from a node's context (its run config);
    ``state_dir`` is where clients keep their states unless the node or run config says."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        """Which client this node holds; the server leaves a node beyond the run's clients idle."""
        algorithm, data = _prepared(load(context))
        partition = _partition(context)
        held = 0 <= partition < data.num_clients
        info = ConfigRecord(
            {
                "partition-id": partition,
                "input-shape": list(algorithm.task.input_shape),
                "num-classes": algorithm.task.num_classes,
                "data-digest": data.clients[partition].digest() if held else "",
            }
        )
        return Message(RecordDict({INFO_RECORD: info}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        config, algorithm, data, partition = _client(context, load)
        with torch_threads(config):
            return _train(message, context, config, algorithm, data, partition)

    def _train(
        message: Message,
        context: Context,
        config: Config,
        algorithm: Algorithm,
        data: ClientData,
        partition: int,
    ) -> Message:
        round_ = int(message.content.config_records[CONFIG_RECORD]["round"])  # type: ignore[arg-type]
        if partition in rounds.plan_round(config, round_, config.data.clients).dropped:
            reason = f"client {partition} drops out of round {round_} (dropout={config.dropout})"
            return Message(Error(DROPPED_OUT, reason), reply_to=message)
        transport = Transport(algorithm)
        received, decoding = transport.receive(
            from_record(message.content.array_records[PAYLOAD_RECORD], algorithm.runtime.device)
        )
        store = _store(context, config, algorithm, state_dir)
        state = _state(store, algorithm, partition, message)
        update, encoding = transport.train(received, state, data, round_, partition)
        written = store.save(partition, round_, update.state)
        named = message.content.config_records[CONFIG_RECORD]
        store.prune(partition, {written, str(named[STATE_FILE]), str(named[COMMITTED_FILE])})
        metrics = MetricRecord(
            {
                NUM_EXAMPLES: update.num_examples,
                CODEC_SECONDS: decoding + encoding,
                **update.metrics,
            }
        )
        content = RecordDict(
            {
                PAYLOAD_RECORD: to_record(update.payload),
                METRICS_RECORD: metrics,
                CONFIG_RECORD: ConfigRecord({STATE_FILE: written}),
            }
        )
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        config, algorithm, data, partition = _client(context, load)
        named = message.content.config_records[CONFIG_RECORD]
        round_ = int(named["round"])  # type: ignore[arg-type]
        transport = Transport(algorithm)
        with torch_threads(config):
            payload, _ = transport.receive(
                from_record(message.content.array_records[PAYLOAD_RECORD], algorithm.runtime.device)
            )
            if named.get(NEW_CLIENT, False):  # nothing stored: a new client's state is thrown away
                new = rounds.evaluate_new_client(algorithm, payload, partition, data, round_)
                counts = (
                    evaluation_metrics(ZERO_SHOT, new.zero_shot)
                    | evaluation_metrics(ADAPTED, new.adapted)
                    | evaluation_metrics(FULL, new.full)
                )
            else:
                store = _store(context, config, algorithm, state_dir)
                state = _state(store, algorithm, partition, message)
                counts = evaluation_metrics(
                    "", transport.evaluate(payload, state, data, round_, partition)
                )
                if named.get(GENERALIZE, False):
                    counts |= evaluation_metrics(GLOBAL, algorithm.evaluate_global(payload, data))
        metrics = MetricRecord(dict(counts))
        return Message(RecordDict({METRICS_RECORD: metrics}), reply_to=message)

    return app


# ----------------------------------------------------------------------------- server side


def connect_clients(
    grid: Grid, num_clients: int, timeout: float
) -> tuple[dict[int, int], Task, dict[int, str]]:
    """Ask every node which client it holds until all ``num_clients`` are there.

    Returns partition id → node id, the task (input shape, classes) the clients report, so
    that the server builds its algorithm without touching any data, and partition id → the
    digest of that client's data (for the checkpoint's record of what the run ran on).
    """
    digests: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    nodes: dict[int, int] = {}
    asked: set[int] = set()
    task: Task | None = None
    while len(nodes) < num_clients:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if not new:
            if time.monotonic() > deadline:
                missing = sorted(set(range(num_clients)) - set(nodes))
                raise FedrirError(
                    f"clients {missing} did not connect within {timeout:.0f} s; start one "
                    "SuperNode per client with --node-config 'partition-id=<i> "
                    f"num-partitions={num_clients}'"
                )
            time.sleep(0.5)
            continue
        asked.update(new)
        content = RecordDict({CONFIG_RECORD: ConfigRecord()})
        queries = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in new]
        for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic())):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise FedrirError(f"node {node} cannot serve this run: {error_reason(reply)}")
            info = reply.content.config_records[INFO_RECORD]
            partition = int(info["partition-id"])  # type: ignore[arg-type]
            reported = Task(
                tuple(info["input-shape"]),  # type: ignore[arg-type]
                int(info["num-classes"]),  # type: ignore[arg-type]
            )
            if task is not None and reported != task:
                raise FedrirError(f"node {node} reports {reported}, others {task}")
            task = reported
            if partition >= num_clients:
                log(
                    WARNING,
                    "node %d holds partition %d, beyond the run's %d clients: idle",
                    node,
                    partition,
                    num_clients,
                )
            elif partition in nodes:
                raise FedrirError(
                    f"nodes {nodes[partition]} and {node} both hold partition {partition}"
                )
            else:
                nodes[partition] = node
                digests[partition] = str(info["data-digest"])
    assert task is not None
    log(INFO, "all %d clients connected", num_clients)
    return nodes, task, digests


def serve(
    grid: Grid,
    config: Config,
    out: Path | None,
    timeout: float,
    on_round: Callable[[RoundRecord | None, int], None] | None = None,
    *,
    resume: bool = False,
) -> RunResult:
    """The whole run on the server side: connect, run the rounds (from the checkpoint in ``out``
    when resuming), write the result files and a checkpoint as the in-process engine does."""
    wall = time.perf_counter()
    snapshot = None
    if out is not None:  # refuse before waiting for the clients
        if resume:
            snapshot = runs.resume_point(out, config)
        else:
            runs.check_new(out)
    elif resume:
        raise FedrirError("a resume needs the run's out-dir; set out-dir in the run config")
    rounds.check_someone_trains(config, config.data.clients)
    nodes, task, digests = connect_clients(grid, config.data.clients, timeout)
    algorithm = get_algorithm(config.algorithm)(config, task, resolve_runtime(config))
    setting = runs.run_setting(algorithm, [digests[p] for p in sorted(digests)])
    if snapshot is not None and out is not None:
        check_setting(snapshot, setting, out)
        wall -= snapshot.wall_seconds
    ledger = None if snapshot is None else Ledger.restore(snapshot.history, snapshot.counters)
    checkpointer = None
    if out is not None:
        runs.start_files(out, config, [] if ledger is None else ledger.history)
        if runs.checkpointed(out, config):
            checkpointer = Checkpointer(
                out / runs.CHECKPOINT_DIR, run_identity(config), setting, wall
            )
        log(INFO, "fedrir: writing results to %s", out)

    def after_round(record: RoundRecord | None, round_: int) -> None:
        if record is not None and out is not None:
            runs.record_round(out, record)
        if on_round is not None:
            on_round(record, round_)

    start = 0 if snapshot is None else snapshot.round
    strategy = FedrirStrategy(
        algorithm,
        nodes,
        after_round,
        checkpointer=checkpointer,
        ledger=ledger,
        files=None if snapshot is None else snapshot.clients,
        start_round=start,
    )
    server = rounds.initial_server(algorithm) if snapshot is None else snapshot.server
    if config.rounds > start:
        strategy.start(grid, to_record(server), num_rounds=config.rounds - start, timeout=timeout)
    return runs.finish_run(algorithm, strategy.ledger, out, wall, "flower")


REPLY_POLL_SECONDS = 0.1


class PromptGrid(Grid):
    """The ServerApp's grid on either engine, collecting replies every
    :data:`REPLY_POLL_SECONDS` (Flower 1.42's ``HttpGrid.send_and_receive`` sleeps 3 s between
    two pulls, which adds up to 3 s to every training and every evaluation phase), and waiting
    ``timeout`` seconds for the *next* reply rather than for all of them: a phase lasts as long
    as replies keep coming, so a thousand clients' evaluation is not cut off by a limit sized
    for twenty. Everything else is Flower's: this only re-implements ``send_and_receive`` on the
    grid's public push and pull."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if pulled and timeout is not None:
                deadline = time.monotonic() + timeout
            if waiting:
                time.sleep(REPLY_POLL_SECONDS)
        return replies


def _out_dir(run_config: Mapping[str, UserConfigValue], config: Config) -> Path:
    chosen = str(run_config.get("out-dir", APP_SETTINGS["out-dir"]))
    return (Path(chosen) if chosen else runs.default_out_dir(config)).resolve()


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    config, settings = config_from_context(context), context.run_config
    resume = settings.get("resume", APP_SETTINGS["resume"])
    if not isinstance(resume, bool):
        raise ConfigError(f"resume must be true or false; got {resume!r}")
    out = _out_dir(settings, config)
    with runs.writing(out, new=not resume), torch_threads(config):
        serve(PromptGrid(grid), config, out, run_timeout(settings), resume=resume)


def run_timeout(run_config: Mapping[str, UserConfigValue]) -> float:
    """The run config's ``timeout`` (seconds), checked."""
    value = run_config.get("timeout", APP_SETTINGS["timeout"])
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ConfigError(f"timeout must be a positive number of seconds; got {value!r}")


client_app = make_client_app()
