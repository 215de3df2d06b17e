"""rpcframe's errors: one tree, one status code per leaf.

::

    RpcframeError
     ├── ConfigError                 invalid configuration (also a ValueError)
     └── RpcError                    a call ended with a non-OK gRPC status
          │                          (.code(), .details(), .trailing_metadata())
          ├── Cancelled              CANCELLED
          ├── Unknown                UNKNOWN
          ├── InvalidArgument        INVALID_ARGUMENT
          ├── DeadlineExceeded       DEADLINE_EXCEEDED
          ├── NotFound               NOT_FOUND
          ├── AlreadyExists          ALREADY_EXISTS
          ├── PermissionDenied       PERMISSION_DENIED
          ├── ResourceExhausted      RESOURCE_EXHAUSTED
          ├── FailedPrecondition     FAILED_PRECONDITION
          ├── Aborted                ABORTED
          ├── OutOfRange             OUT_OF_RANGE
          ├── Unimplemented          UNIMPLEMENTED
          ├── Internal               INTERNAL
          ├── Unavailable            UNAVAILABLE
          ├── DataLoss               DATA_LOSS
          └── Unauthenticated        UNAUTHENTICATED

Clients: every ``grpc.RpcError`` a call raises is translated into the matching
leaf at one boundary (:func:`from_grpc`), so ``except rpcframe.NotFound`` works
for every call kind on both fronts. ``RpcError`` also subclasses
``grpc.RpcError`` so code written against raw grpcio keeps catching it.

Servers: a handler that raises an ``RpcError`` ends the call with its code,
details and trailing metadata. Other exceptions are mapped by
:data:`DEFAULT_EXCEPTION_STATUS` (first matching base class wins); anything
else becomes INTERNAL with a reference id, and the traceback is logged on the
server, never sent to the client.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from ._core.errors import ConfigError, RpcframeError

__all__ = [
    "DEFAULT_EXCEPTION_STATUS",
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ConfigError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RpcError",
    "RpcframeError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "error_for",
    "from_grpc",
]

Metadata = Sequence[tuple[str, str | bytes]]


class RpcError(RpcframeError, grpc.RpcError):  # type: ignore[misc]
    """A call ended with a non-OK status.

    Raise a subclass from a handler to end the call with that status, e.g.
    ``raise rpcframe.NotFound("order 42 does not exist")``.
    """

    #: The status code this class stands for.
    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, trailing_metadata: Metadata = ()) -> None:
        super().__init__(details)
        self._details = details
        self._trailing_metadata: tuple[tuple[str, str | bytes], ...] = tuple(trailing_metadata)

    # Methods, not attributes, so code written for grpc.RpcError (e.code())
    # works unchanged on rpcframe errors.
    def code(self) -> grpc.StatusCode:
        """The gRPC status code."""
        return self.status

    def details(self) -> str:
        """The status message."""
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """Trailing metadata sent (or to be sent) with the status."""
        return self._trailing_metadata

    def __str__(self) -> str:
        return f"{self.status.name}: {self._details}" if self._details else self.status.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._details!r})"


class Cancelled(RpcError):
    """The call was cancelled, typically by the caller."""

    status = grpc.StatusCode.CANCELLED


class Unknown(RpcError):
    """The server reported an error with no more specific status."""

    status = grpc.StatusCode.UNKNOWN


class InvalidArgument(RpcError):
    """The request is invalid regardless of the server's state."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(RpcError):
    """The deadline passed before the call completed."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(RpcError):
    """A requested entity does not exist."""

    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RpcError):
    """The entity the call tried to create already exists."""

    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(RpcError):
    """The caller is known but not allowed to do this."""

    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(RpcError):
    """A quota or limit was hit (message size, rate, memory)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    """The system is not in a state required for the operation."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RpcError):
    """The operation was aborted, typically by a concurrency conflict."""

    status = grpc.StatusCode.ABORTED


class OutOfRange(RpcError):
    """The operation went past a valid range."""

    status = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(RpcError):
    """The method is not implemented or not known by the server."""

    status = grpc.StatusCode.UNIMPLEMENTED


class Internal(RpcError):
    """An invariant broke inside the server or the transport."""

    status = grpc.StatusCode.INTERNAL


class Unavailable(RpcError):
    """The service cannot be reached now; the call may be retried."""

    status = grpc.StatusCode.UNAVAILABLE


class DataLoss(RpcError):
    """Unrecoverable data loss or corruption."""

    status = grpc.StatusCode.DATA_LOSS


class Unauthenticated(RpcError):
    """The caller has no valid credentials."""

    status = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    cls.status: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}  # fmt: skip

#: Python exceptions a handler may raise and the status they end the call
#: with; the exception's message becomes the status details. Checked in
#: order, so subclasses come before their bases.
DEFAULT_EXCEPTION_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (PermissionError, grpc.StatusCode.PERMISSION_DENIED),
    (FileNotFoundError, grpc.StatusCode.NOT_FOUND),
    (FileExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ConnectionError, grpc.StatusCode.UNAVAILABLE),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def error_for(code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()) -> RpcError:
    """Build the error of the tree that stands for ``code``."""
    cls = _BY_CODE.get(code, Unknown)
    err = cls(details, trailing_metadata=trailing_metadata)
    if cls is Unknown and code is not grpc.StatusCode.UNKNOWN:
        err.status = code  # keep an unexpected code (e.g. OK) visible rather than lose it
    return err


def from_grpc(exc: grpc.RpcError) -> RpcError:
    """Translate an error raised by grpcio (sync or asyncio) into the tree.

    This is the one place foreign errors enter rpcframe on the client side.
    """
    if isinstance(exc, RpcError):
        return exc
    code_fn = getattr(exc, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(exc, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    trailing_fn = getattr(exc, "trailing_metadata", None)
    trailing = (trailing_fn() if callable(trailing_fn) else None) or ()
    err = error_for(code, details, tuple(trailing))
    err.__cause__ = exc
    return err
