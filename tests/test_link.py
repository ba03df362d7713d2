"""The orchestrator's side of a worker's stream (orchestrator/link.py): tasks become futures that a
result of the same id completes, a failure is a ``grpc.RpcError`` with the code a unary call would
have had, and every task and result lands in the ledger that recorded when the task was sent. The
worker's side is played by hand here; tests/test_services.py and tests/test_netns.py run the real
stream."""

from __future__ import annotations

import time

import grpc
import pytest

from fedseq import ledger as ledger_mod
from fedseq.ledger import Ledger
from fedseq.v1 import orchestrator_pb2 as orch_pb
from fedseq.v1 import worker_pb2
from orchestrator.link import WorkerLink, status_code


def _sent(link: WorkerLink) -> list[orch_pb.OrchestratorMessage]:
    """What the link would send down the stream now (without waiting for a heartbeat)."""
    out = []
    while not link._out.empty():
        msg = link._out.get_nowait()
        if msg is not None:
            out.append(msg)
    return out


def _result(task_id: int, **reply) -> orch_pb.WorkerMessage:
    return orch_pb.WorkerMessage(result=worker_pb2.TaskResult(task_id=task_id, **reply))


def test_a_result_of_the_tasks_id_completes_its_future_and_both_are_in_the_ledger():
    # Prepare
    link = WorkerLink("w0", compression="none")
    led = Ledger("r", 3, 1, "train")
    # Execute
    with ledger_mod.recording(led):
        fut = link.call(worker_pb2.EvaluateRequest(run_id="r", users=[1, 2]), timeout=30)
    (task,) = _sent(link)
    reply = worker_pb2.EvaluateReply(seconds=0.5)
    link.received(_result(task.task.task_id, evaluate=reply))
    led.settle(5)
    # Assert
    assert task.task.WhichOneof("request") == "evaluate" and list(task.task.evaluate.users) == [1, 2]
    assert fut.result(0) == reply
    whats = {(e.what, e.direction, e.bytes) for e in led.entries}
    assert whats == {("Orchestrator.Connect evaluate task", "down", task.ByteSize()),
                     ("Orchestrator.Connect evaluate result", "up",
                      _result(task.task.task_id, evaluate=reply).ByteSize())}
    assert all(e.link == "worker-orchestrator" and e.worker == "w0" for e in led.entries)


def test_the_workers_refusal_is_an_rpc_error_with_its_code():
    link = WorkerLink("w0")
    fut = link.call(worker_pb2.TrainRequest(run_id="r"), timeout=30)
    (task,) = _sent(link)
    link.received(_result(task.task.task_id, error=worker_pb2.TaskError(code="INVALID_ARGUMENT", details="no")))
    with pytest.raises(grpc.RpcError) as e:
        fut.result(0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == "no"
    assert status_code("NOT_A_CODE") == grpc.StatusCode.UNKNOWN


def test_a_result_of_the_wrong_kind_fails_the_task_and_an_unknown_id_is_dropped():
    link = WorkerLink("w0")
    fut = link.call(worker_pb2.DescribeRequest(), timeout=30)
    (task,) = _sent(link)
    link.received(_result(999, describe=worker_pb2.DescribeReply()))  # nobody asked: dropped
    assert not fut.done() and not link.closed
    link.received(_result(task.task.task_id, train=worker_pb2.TrainReply()))
    with pytest.raises(grpc.RpcError) as e:
        fut.result(0)
    assert e.value.code() == grpc.StatusCode.INTERNAL and "a train result to a describe task" in e.value.details()


def test_a_task_without_a_result_in_time_is_deadline_exceeded():
    link = WorkerLink("w0")
    t0 = time.monotonic()
    fut = link.call(worker_pb2.DescribeRequest(), timeout=0.2)
    with pytest.raises(grpc.RpcError) as e:
        fut.result(5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 4


def test_closing_fails_every_waiting_task_unavailable_and_refuses_new_ones():
    # Prepare: two tasks in flight, recorded in a ledger
    link = WorkerLink("w0")
    led = Ledger("r", 0, 1, "train")
    with ledger_mod.recording(led):
        futs = [link.call(worker_pb2.DescribeRequest(), timeout=30) for _ in range(2)]
    # Execute: the stream ends
    link.close("the worker ended its stream")
    later = link.call(worker_pb2.DescribeRequest(), timeout=30)
    # Assert: nobody waits for a result that cannot come, and the ledger's calls are settled
    for f in [*futs, later]:
        with pytest.raises(grpc.RpcError) as e:
            f.result(0)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "ended its stream" in e.value.details()
    led.settle(0.5)
    assert led._calls == 0
    assert list(link.outgoing()) == []  # the stream's generator ends


def test_an_idle_stream_sends_heartbeats_and_a_silent_worker_is_closed():
    # Prepare: a short period; the worker sends one heartbeat, then nothing
    link = WorkerLink("w0", heartbeat=0.05)
    link.received(orch_pb.WorkerMessage(heartbeat=orch_pb.Heartbeat(sent_unix=1.0)))
    # Execute: read what the link sends until it gives up on the silent worker
    sent = list(link.outgoing())
    beats = link.take_heartbeats()
    # Assert
    assert sent and all(m.WhichOneof("body") == "heartbeat" for m in sent)
    assert link.closed and "no word from the worker" in link.reason
    by_dir = {c.direction: c for c in beats}
    assert by_dir["up"].messages == 1 and by_dir["down"].messages == len(sent)
    assert by_dir["down"].bytes == sum(m.ByteSize() for m in sent)
    assert link.take_heartbeats() == []  # taken once


def test_a_message_other_than_a_result_or_heartbeat_after_the_hello_closes_the_link():
    link = WorkerLink("w0")
    link.received(orch_pb.WorkerMessage(hello=orch_pb.RegisterRequest(worker_id="w0")))
    assert link.closed and "protocol error" in link.reason


def test_a_flood_of_results_for_tasks_never_sent_cuts_the_stream():
    link = WorkerLink("w0")
    for i in range(64):
        link.received(_result(10_000 + i, describe=worker_pb2.DescribeReply()))
    assert not link.closed
    link.received(_result(20_000, describe=worker_pb2.DescribeReply()))
    assert link.closed and "never sent" in link.reason
