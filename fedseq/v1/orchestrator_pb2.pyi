from fedseq.v1 import worker_pb2 as _worker_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "result", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: RegisterRequest
    result: _worker_pb2.TaskResult
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[RegisterRequest, _Mapping]] = ..., result: _Optional[_Union[_worker_pb2.TaskResult, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class OrchestratorMessage(_message.Message):
    __slots__ = ("welcome", "task", "heartbeat")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    welcome: RegisterReply
    task: _worker_pb2.Task
    heartbeat: Heartbeat
    def __init__(self, welcome: _Optional[_Union[RegisterReply, _Mapping]] = ..., task: _Optional[_Union[_worker_pb2.Task, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix",)
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    sent_unix: float
    def __init__(self, sent_unix: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "device", "kind", "held_index", "held_count")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HELD_INDEX_FIELD_NUMBER: _ClassVar[int]
    HELD_COUNT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    device: str
    kind: str
    held_index: int
    held_count: int
    def __init__(self, worker_id: _Optional[str] = ..., device: _Optional[str] = ..., kind: _Optional[str] = ..., held_index: _Optional[int] = ..., held_count: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("run_id", "config_json", "aggregator", "shard_index", "shard_count", "heartbeat_seconds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_json: str
    aggregator: str
    shard_index: int
    shard_count: int
    heartbeat_seconds: float
    def __init__(self, run_id: _Optional[str] = ..., config_json: _Optional[str] = ..., aggregator: _Optional[str] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., heartbeat_seconds: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "state", "epoch", "epochs", "round_id", "model_version", "workers", "last_metrics_json", "message", "bytes_up", "bytes_down", "results_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    RESULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: str
    epoch: int
    epochs: int
    round_id: int
    model_version: int
    workers: int
    last_metrics_json: str
    message: str
    bytes_up: int
    bytes_down: int
    results_json: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., round_id: _Optional[int] = ..., model_version: _Optional[int] = ..., workers: _Optional[int] = ..., last_metrics_json: _Optional[str] = ..., message: _Optional[str] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., results_json: _Optional[str] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class StopReply(_message.Message):
    __slots__ = ("stopping",)
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    stopping: bool
    def __init__(self, stopping: _Optional[bool] = ...) -> None: ...
