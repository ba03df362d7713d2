from fedseq.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartRunRequest(_message.Message):
    __slots__ = ("run_id", "config_json", "num_items")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_json: str
    num_items: int
    def __init__(self, run_id: _Optional[str] = ..., config_json: _Optional[str] = ..., num_items: _Optional[int] = ...) -> None: ...

class StartRunReply(_message.Message):
    __slots__ = ("head_version", "num_parameters", "accepted_encodings", "resumed", "max_chunk_bytes", "store_bytes")
    HEAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    head_version: int
    num_parameters: int
    accepted_encodings: _containers.RepeatedScalarFieldContainer[str]
    resumed: bool
    max_chunk_bytes: int
    store_bytes: int
    def __init__(self, head_version: _Optional[int] = ..., num_parameters: _Optional[int] = ..., accepted_encodings: _Optional[_Iterable[str]] = ..., resumed: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ..., store_bytes: _Optional[int] = ...) -> None: ...

class OpenRoundRequest(_message.Message):
    __slots__ = ("run_id", "round_id", "model_version", "assignments", "deadline_unix", "lr")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round_id: int
    model_version: int
    assignments: _containers.RepeatedCompositeFieldContainer[_common_pb2.Assignment]
    deadline_unix: float
    lr: float
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ..., model_version: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[_common_pb2.Assignment, _Mapping]]] = ..., deadline_unix: _Optional[float] = ..., lr: _Optional[float] = ...) -> None: ...

class OpenRoundReply(_message.Message):
    __slots__ = ("round_id", "expected", "max_chunk_bytes", "accepted_encodings")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    expected: int
    max_chunk_bytes: int
    accepted_encodings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round_id: _Optional[int] = ..., expected: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., accepted_encodings: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("run_id", "round_id", "user_id", "token", "num_samples", "total_bytes", "encoding", "loss")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round_id: int
    user_id: int
    token: str
    num_samples: int
    total_bytes: int
    encoding: str
    loss: float
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ..., user_id: _Optional[int] = ..., token: _Optional[str] = ..., num_samples: _Optional[int] = ..., total_bytes: _Optional[int] = ..., encoding: _Optional[str] = ..., loss: _Optional[float] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("statuses", "bytes_received")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[_common_pb2.UpdateStatus]
    bytes_received: int
    def __init__(self, statuses: _Optional[_Iterable[_Union[_common_pb2.UpdateStatus, _Mapping]]] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class CloseRoundRequest(_message.Message):
    __slots__ = ("run_id", "round_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round_id: int
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("user_id", "reason")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    reason: str
    def __init__(self, user_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round_id", "new_version", "accepted", "rejected", "missing", "bytes_received", "timings", "defense", "defense_info_json", "kept_users", "store_bytes", "update_norm", "store_bytes_read", "patch_bytes", "refused", "bytes_refused", "refused_sample", "kept_reported", "user_bytes", "refused_by_engine")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class UserBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEFENSE_FIELD_NUMBER: _ClassVar[int]
    DEFENSE_INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    KEPT_USERS_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    PATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    BYTES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    KEPT_REPORTED_FIELD_NUMBER: _ClassVar[int]
    USER_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_BY_ENGINE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    new_version: int
    accepted: int
    rejected: _containers.RepeatedCompositeFieldContainer[Rejection]
    missing: _containers.RepeatedScalarFieldContainer[int]
    bytes_received: int
    timings: _containers.ScalarMap[str, float]
    defense: str
    defense_info_json: str
    kept_users: _containers.RepeatedScalarFieldContainer[int]
    store_bytes: int
    update_norm: float
    store_bytes_read: int
    patch_bytes: int
    refused: _containers.ScalarMap[str, int]
    bytes_refused: int
    refused_sample: _containers.RepeatedCompositeFieldContainer[Rejection]
    kept_reported: bool
    user_bytes: _containers.ScalarMap[int, int]
    refused_by_engine: int
    def __init__(self, round_id: _Optional[int] = ..., new_version: _Optional[int] = ..., accepted: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., missing: _Optional[_Iterable[int]] = ..., bytes_received: _Optional[int] = ..., timings: _Optional[_Mapping[str, float]] = ..., defense: _Optional[str] = ..., defense_info_json: _Optional[str] = ..., kept_users: _Optional[_Iterable[int]] = ..., store_bytes: _Optional[int] = ..., update_norm: _Optional[float] = ..., store_bytes_read: _Optional[int] = ..., patch_bytes: _Optional[int] = ..., refused: _Optional[_Mapping[str, int]] = ..., bytes_refused: _Optional[int] = ..., refused_sample: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., kept_reported: _Optional[bool] = ..., user_bytes: _Optional[_Mapping[int, int]] = ..., refused_by_engine: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("run_id", "version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    version: int
    def __init__(self, run_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("version", "total_bytes", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: int
    total_bytes: int
    data: bytes
    def __init__(self, version: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
