from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "encoding", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    encoding: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., encoding: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class MetricSums(_message.Message):
    __slots__ = ("users", "hr10", "ndcg10", "er")
    class ErEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    USERS_FIELD_NUMBER: _ClassVar[int]
    HR10_FIELD_NUMBER: _ClassVar[int]
    NDCG10_FIELD_NUMBER: _ClassVar[int]
    ER_FIELD_NUMBER: _ClassVar[int]
    users: int
    hr10: float
    ndcg10: float
    er: _containers.ScalarMap[int, float]
    def __init__(self, users: _Optional[int] = ..., hr10: _Optional[float] = ..., ndcg10: _Optional[float] = ..., er: _Optional[_Mapping[int, float]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("user_id", "token", "weight")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    token: str
    weight: int
    def __init__(self, user_id: _Optional[int] = ..., token: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class UpdateStatus(_message.Message):
    __slots__ = ("user_id", "accepted", "reason", "bytes")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    accepted: bool
    reason: str
    bytes: int
    def __init__(self, user_id: _Optional[int] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ByteCount(_message.Message):
    __slots__ = ("kind", "what", "direction", "user_id", "bytes", "wire_bytes", "messages", "link")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    kind: str
    what: str
    direction: str
    user_id: int
    bytes: int
    wire_bytes: int
    messages: int
    link: str
    def __init__(self, kind: _Optional[str] = ..., what: _Optional[str] = ..., direction: _Optional[str] = ..., user_id: _Optional[int] = ..., bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., messages: _Optional[int] = ..., link: _Optional[str] = ...) -> None: ...
