"""``fedrir clientapp``: one long-lived ClientApp process beside a SuperNode.

Under Flower's default ``--isolation subprocess`` a SuperNode starts a new ``flwr-clientapp``
process for every message it receives, and each one imports torch, fedrir and the dataset again:
on loopback that cost about 15 s per message, far more than the training itself. A SuperNode
started with ``--isolation process`` starts nothing; it queues each message as a *task* on its
local Runtime API and waits for a process to claim it. This module is that process: it claims
the node's tasks one after another and runs fedrir's ClientApp on each inside the same Python
process, so the imports, the prepared data and the node's state cache
(:class:`~fedrir.engine.store.NodeStore`) are paid for once per node, not once per message.

Each task goes through the steps of Flower's own ``flwr-clientapp``
(:mod:`flwr.supernode.runtime.run_clientapp`, whose functions are called here unchanged): claim a
token, pull the message and context, run the app, push the reply and the task's final status, with
task heartbeats meanwhile. Only the process lifetime differs: ``flwr-clientapp`` exits after one
task, this loop takes the next. It serves fedrir's app only; a run of another Flower app gets an
error reply naming the app.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import ERROR, INFO

from flwr.app import Error, Message
from flwr.common import log
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedrir.flower.app import client_app

POLL_SECONDS = 0.05
"""How long the loop waits between two looks for a task (Flower's SuperExec waits 1 s)."""

APP_NAME = "fedrir"
"""The Flower app this process serves (``[project] name`` in ``pyproject.toml``)."""

BeforeTask = Callable[[Message], None]


def _client(address: str, root_certificates: bytes | None, token: str | None) -> RuntimeHttpClient:
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")
    ]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Keep a claimed task alive; unlike Flower's version, a refused heartbeat (the run was
    stopped) does not interrupt this process, which outlives the task."""

    def send() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except Exception:  # the transport failed: Flower's sender retries with a backoff
            return False
        return True

    return send


def run_task(
    address: str, root_certificates: bytes | None, token: str, before: BeforeTask | None
) -> None:
    """Run one claimed task (``token``) to its end: its reply and final status pushed."""
    client = _client(address, root_certificates, token)
    heartbeat = HeartbeatSender(_heartbeat(client))
    heartbeat.start()
    context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, run, _ = pull_task_input(client)
        if before is not None:
            before(message)
        if run.fab_id.rpartition("/")[2] != APP_NAME:
            reason = f"this node's `fedrir clientapp` serves the fedrir app only, not {run.fab_id}"
            reply = Message(Error(ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason), reply_to=message)
        else:
            try:
                start = time.perf_counter()
                reply = client_app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
                log(
                    INFO,
                    "fedrir clientapp: %s message (round %s) handled in %.2f s",
                    message.metadata.message_type,
                    message.metadata.group_id or "-",
                    time.perf_counter() - start,
                )
            except Exception as ex:  # as flwr-clientapp: the server gets the error as a reply
                log(ERROR, "ClientApp raised an exception", exc_info=ex)
                reason = f"{type(ex)}:<'{ex}'>"
                details = reason
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message
                )
        push_message(client, reply, context)
    finally:
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()


def serve_clientapps(
    address: str,
    root_certificates: bytes | None = None,
    *,
    poll: float = POLL_SECONDS,
    before_task: BeforeTask | None = None,
) -> None:
    """Claim and run the ClientApp tasks of the SuperNode whose Runtime API is at ``address``
    (``host:port``, its ``--port``), until this process is stopped. ``root_certificates``: the
    CA of a Runtime API served with TLS (None: plain HTTP, for a node's own loopback).
    ``before_task(message)`` is called with each message before the app handles it."""
    client = _client(address, root_certificates, None)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    log(INFO, "fedrir clientapp: serving the SuperNode at %s", address)
    try:
        while True:
            claimed = client.AcquireTask(request)
            if claimed.HasField("task") and claimed.token:
                try:
                    run_task(address, root_certificates, claimed.token, before_task)
                except Exception as ex:  # one failed task (e.g. its run was stopped), not the node
                    log(ERROR, "fedrir clientapp: a task failed: %s", ex, exc_info=ex)
            else:
                time.sleep(poll)
    finally:
        client.close()
