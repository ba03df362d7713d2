from fedseq.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(_message.Message):
    __slots__ = ("task_id", "describe", "train", "evaluate")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIBE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    describe: DescribeRequest
    train: TrainRequest
    evaluate: EvaluateRequest
    def __init__(self, task_id: _Optional[int] = ..., describe: _Optional[_Union[DescribeRequest, _Mapping]] = ..., train: _Optional[_Union[TrainRequest, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluateRequest, _Mapping]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "describe", "train", "evaluate", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIBE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    describe: DescribeReply
    train: TrainReply
    evaluate: EvaluateReply
    error: TaskError
    def __init__(self, task_id: _Optional[int] = ..., describe: _Optional[_Union[DescribeReply, _Mapping]] = ..., train: _Optional[_Union[TrainReply, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluateReply, _Mapping]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ...) -> None: ...

class TaskError(_message.Message):
    __slots__ = ("code", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: str
    details: str
    def __init__(self, code: _Optional[str] = ..., details: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("worker_id", "users", "device", "threads", "ready", "run_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    users: _containers.RepeatedScalarFieldContainer[int]
    device: str
    threads: int
    ready: bool
    run_id: str
    def __init__(self, worker_id: _Optional[str] = ..., users: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ..., threads: _Optional[int] = ..., ready: _Optional[bool] = ..., run_id: _Optional[str] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("run_id", "round_id", "model_version", "assignments", "deadline_unix", "encoding", "accepted_encodings", "adversarial")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    ADVERSARIAL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round_id: int
    model_version: int
    assignments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Assignment]
    deadline_unix: float
    encoding: str
    accepted_encodings: _containers.RepeatedScalarFieldContainer[str]
    adversarial: bool
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ..., model_version: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[_common_pb2.Assignment, _Mapping]]] = ..., deadline_unix: _Optional[float] = ..., encoding: _Optional[str] = ..., accepted_encodings: _Optional[_Iterable[str]] = ..., adversarial: _Optional[bool] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("statuses", "bytes_sent", "model_bytes_read", "timings", "ledger")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_common_pb2.UpdateStatus]
    bytes_sent: int
    model_bytes_read: int
    timings: _containers.ScalarMap[str, float]
    ledger: _containers.RepeatedCompositeFieldContainer[_common_pb2.ByteCount]
    def __init__(self, statuses: _Optional[_Iterable[_Union[_common_pb2.UpdateStatus, _Mapping]]] = ..., bytes_sent: _Optional[int] = ..., model_bytes_read: _Optional[int] = ..., timings: _Optional[_Mapping[str, float]] = ..., ledger: _Optional[_Iterable[_Union[_common_pb2.ByteCount, _Mapping]]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("run_id", "model_version", "users", "protocol", "targets")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_version: int
    users: _containers.RepeatedScalarFieldContainer[int]
    protocol: str
    targets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, run_id: _Optional[str] = ..., model_version: _Optional[int] = ..., users: _Optional[_Iterable[int]] = ..., protocol: _Optional[str] = ..., targets: _Optional[_Iterable[int]] = ...) -> None: ...

class EvaluateReply(_message.Message):
    __slots__ = ("sums", "seconds", "model_bytes_read", "ledger")
    SUMS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    sums: _common_pb2.MetricSums
    seconds: float
    model_bytes_read: int
    ledger: _containers.RepeatedCompositeFieldContainer[_common_pb2.ByteCount]
    def __init__(self, sums: _Optional[_Union[_common_pb2.MetricSums, _Mapping]] = ..., seconds: _Optional[float] = ..., model_bytes_read: _Optional[int] = ..., ledger: _Optional[_Iterable[_Union[_common_pb2.ByteCount, _Mapping]]] = ...) -> None: ...
