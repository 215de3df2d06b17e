"""A blocking unary-unary attempt sent through grpc's Cython channel, without grpc's per-call Python state.

grpc's ``UnaryUnaryMultiCallable.__call__`` builds an ``_RPCState`` (with a
``threading.Condition``), a set of due operations, wait-for-ready flags as
an int subclass, and walks the completed batch's operations one by one;
measured with callgrind, one call in flight, that Python is about 71k
instructions of a ~243k-instruction call. :class:`LeanSyncUnary` sends the
same batch of six operations on the same segregated call
(``cygrpc.Channel.segregated_call``) and reads the answer from the
operations themselves. A call made inside a handler carries a
:class:`Cancellable` its incoming call's scope can cancel from another
thread, so it blocks on the handler's thread too (grpc's ``future()``,
used for that before, went through grpc's channel thread: ~226k
instructions more per relayed call, see ``benchmarks/instructions.py``'s
``sync-relay``).

Behaviour is grpc's: the same deadline (the smaller of the call's and the
one grpc propagates from an incoming grpc call), the same errors (grpc's
own ``_InactiveRpcError`` with code, details, metadata and debug string;
INTERNAL for a response that does not deserialize). Per-call credentials
or compression, a request that does not serialize, ``with_call`` and
``future``, and grpc with its observability plugin recording (which reads
grpc's per-call state) take grpc's multicallable. Relies on grpc's
internals: the pinned grpcio range is tested, and
``tests/integration/test_sync_unary.py`` fails if this path stops being taken.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from grpc import _channel, _common, _observability
from grpc._cython import cygrpc

__all__ = ["Cancellable", "LeanSyncUnary", "lean_sync_unary"]

_LOGGER = logging.getLogger(__name__)
_CODES = _common.CYGRPC_STATUS_CODE_TO_STATUS_CODE
_OK = cygrpc.StatusCode.ok
_PROPAGATE = cygrpc.PropagationConstants.GRPC_PROPAGATE_DEFAULTS
_parent_deadline = cygrpc.get_deadline_from_context
_CANCELLED = cygrpc.StatusCode.cancelled
_CANCELLED_DETAILS = "Locally cancelled by application!"  # grpc's words
_SendInitialMetadata = cygrpc.SendInitialMetadataOperation
_SendMessage = cygrpc.SendMessageOperation
_SendClose = cygrpc.SendCloseFromClientOperation
_ReceiveInitialMetadata = cygrpc.ReceiveInitialMetadataOperation
_ReceiveMessage = cygrpc.ReceiveMessageOperation
_ReceiveStatus = cygrpc.ReceiveStatusOnClientOperation
#: False once grpc's Cython channel refused arguments grpc's own call takes (another grpc
#: version): every method then takes grpc's multicallable.
available = True
#: The initial-metadata flags grpc sends for wait_for_ready None / True / False.
_FLAGS = {value: int(_channel._InitialMetadataFlags().with_wait_for_ready(value)) for value in (None, True, False)}


class LeanSyncUnary:
    """A unary-unary multicallable on one grpc channel whose blocking call skips grpc's per-call Python state."""

    __slots__ = ("_channel", "_context", "_deserialize", "_handle", "_method", "_serialize", "fallback", "future",
                 "with_call")  # fmt: skip

    def __init__(self, multicallable: Any) -> None:
        # The fields grpc's own blocking call is built from.
        self._channel = multicallable._channel  # cygrpc.Channel
        self._method: bytes = multicallable._method
        self._handle: int = multicallable._registered_call_handle
        self._context = multicallable._context
        self._serialize = multicallable._request_serializer
        self._deserialize = multicallable._response_deserializer
        #: grpc's multicallable, for what this one does not do itself.
        self.fallback = multicallable
        self.with_call = multicallable.with_call
        self.future = multicallable.future

    def __call__(
        self, request: Any, timeout: float | None = None, metadata: Any = None,
        credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None, *, cancel: Cancellable | None = None,
    ) -> Any:  # fmt: skip
        """One blocking call, as grpc's ``UnaryUnaryMultiCallable.__call__``.

        ``cancel`` lets another thread cancel it; cancelled, it raises
        ``grpc.FutureCancelledError`` (as grpc's future does).
        """
        if credentials is not None or compression is not None or not available:
            return self.fallback(request, timeout, metadata, credentials, wait_for_ready, compression)
        if self._serialize is None:
            payload = request
        else:
            try:
                payload = self._serialize(request)
            except Exception:  # noqa: BLE001 - grpc's own call reports it (INTERNAL, logged)
                return self.fallback(request, timeout, metadata, credentials, wait_for_ready, compression)
        deadline = None if timeout is None else time.time() + timeout
        parent = _parent_deadline()  # grpc propagates an incoming grpc call's deadline to calls made in it
        if parent is not None:
            deadline = parent if deadline is None else min(parent, deadline)
        received, status = _ReceiveMessage(0), _ReceiveStatus(0)
        initial = _ReceiveInitialMetadata(0)
        operations = (_SendInitialMetadata(metadata, _FLAGS[wait_for_ready]), _SendMessage(payload, 0), _SendClose(0),
                      initial, received, status)  # fmt: skip
        try:
            call = self._channel.segregated_call(_PROPAGATE, self._method, None, deadline, metadata, None,
                                                 ((operations, None),), self._context, self._handle)  # fmt: skip
        except TypeError:
            return self._refused(request, timeout, metadata, wait_for_ready)
        if cancel is not None:
            cancel.call = call
            if cancel.cancelled:  # before the call existed: cancel it now
                call.cancel(_CANCELLED, _CANCELLED_DETAILS)
        call.next_event()
        if status.code() == _OK:
            message = received.message()
            if message is None or self._deserialize is None:
                return message
            try:
                return self._deserialize(message)
            except Exception:  # as grpc: logged, and the call fails INTERNAL
                _LOGGER.exception("Exception deserializing message!")
                raise _error(initial, status, grpc.StatusCode.INTERNAL, "Exception deserializing response!") from None
        if cancel is not None and cancel.cancelled:
            raise grpc.FutureCancelledError()
        code = _CODES.get(status.code())
        if code is None:  # grpc's words for it
            details = f"Server sent unknown code {status.code()} and details {status.details()}"
            raise _error(initial, status, grpc.StatusCode.UNKNOWN, details)
        raise _error(initial, status, code, status.details())


    def _refused(self, request: Any, timeout: float | None, metadata: Any, wait_for_ready: bool | None) -> Any:
        """grpc's Cython channel refused the call's arguments: the caller's (grpc's call refuses them too)
        or, if grpc's call takes them, another grpc's signature: stop using this path."""
        try:
            response = self.fallback(request, timeout, metadata, None, wait_for_ready, None)
        except TypeError:
            raise
        except BaseException:
            _disable(_REFUSED)
            raise
        _disable(_REFUSED)
        return response


class Cancellable:
    """What a call made while handling another gives the incoming call's scope: ``cancel()`` from any thread."""

    __slots__ = ("call", "cancelled")

    def __init__(self) -> None:
        self.call: Any = None  # the segregated call, once made
        self.cancelled = False

    def cancel(self) -> bool:
        """Cancel the call (now, or as soon as it is made)."""
        self.cancelled = True
        call = self.call
        if call is not None:
            call.cancel(_CANCELLED, _CANCELLED_DETAILS)  # grpc's segregated calls take a cancel from any thread
        return True


_REFUSED = "grpc's Cython channel did not take a unary call's arguments"


def _disable(why: str) -> None:
    global available
    if available:
        available = False
        _LOGGER.warning("%s: using grpc's calls", why)


def _error(initial: Any, status: Any, code: grpc.StatusCode, details: str) -> grpc.RpcError:
    """grpc's own error for a blocking unary call that ended with ``code``."""
    state = _channel._RPCState((), initial.initial_metadata(), status.trailing_metadata(), code, details)
    state.debug_error_string = status.error_string()
    return _channel._InactiveRpcError(state)


def _recording() -> bool:
    """Whether grpc's observability plugin records call latencies (it reads grpc's per-call state)."""
    with _observability.get_plugin() as plugin:
        return bool(plugin and plugin.stats_enabled)


def lean_sync_unary(multicallable: Any) -> Any:
    """``multicallable`` (grpc, unary-unary) as a :class:`LeanSyncUnary`, or itself where that cannot work."""
    if not available or _recording():
        return multicallable
    try:
        return LeanSyncUnary(multicallable)
    except AttributeError:  # grpc laid out otherwise: keep its own calls (said once, not per method)
        _disable("grpc's unary multicallable is laid out otherwise")
        return multicallable
