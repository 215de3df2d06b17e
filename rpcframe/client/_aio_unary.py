"""A unary-unary attempt sent through grpc's Cython channel, without grpc.aio's call object.

grpc.aio runs every unary call as an asyncio Task driving the Cython call
(``cygrpc._AioCall.unary_unary``: one batch of six operations), wrapped
in a call object with its own metadata conversions, done-callback
closures and status future. Measured with callgrind, one call in flight,
that Python layer is about 88k instructions of a ~274k-instruction call.
rpcframe's :class:`~rpcframe.client._aio_call.Call` already is the awaited
object that reports the outcome, so an attempt here needs no Task: the
batch starts when the stub method is called (as grpc.aio's does, one loop
turn earlier), and the task that awaits the attempt resumes the Cython
coroutine itself when the batch completes. An attempt nobody awaits is
finished by the batch future's done-callback, so its status, metadata
and done-callbacks arrive all the same.

What grpc.aio's unary call object offers that rpcframe or a user reads is
kept: ``await`` (the response, ``grpc.aio.AioRpcError`` on a status,
``asyncio.CancelledError`` once cancelled locally), ``cancel``, ``done``,
``cancelled``, ``time_remaining``, ``add_done_callback``, the status and
metadata coroutines; the attempt is registered with the grpc.aio channel,
whose ``close(grace)`` waits for it and then cancels it, as its own calls.
Calls with per-call credentials or compression, and grpc versions whose
Cython channel does not answer as expected (checked once, see
:func:`lean_unary`), take grpc.aio's multicallable.

Relies on grpc.aio's internals (``grpc._cython.cygrpc``): the pinned grpcio
range is tested, and ``tests/integration/test_aio_unary.py`` fails if the
fast path stops being taken.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Generator
from typing import Any, NoReturn

import grpc
import grpc.aio
from grpc import _common
from grpc._cython import cygrpc

__all__ = ["LeanUnary", "UnaryAttempt", "lean_unary"]

_LOGGER = logging.getLogger(__name__)
_CANCELLED = "Locally cancelled by application!"  # grpc.aio's details for a local cancel
_CODES = _common.CYGRPC_STATUS_CODE_TO_STATUS_CODE
_census = cygrpc.build_census_context
_Metadata = grpc.aio.Metadata

#: False once grpc's Cython channel refused an attempt's arguments (another grpc
#: version): every method then takes grpc.aio's multicallable.
available = True


class LeanUnary:
    """A unary-unary multicallable on one grpc.aio channel that sends :class:`UnaryAttempt`\\ s."""

    __slots__ = ("_active", "_channel", "_deserialize", "_handle", "_method", "_serialize", "fallback")

    def __init__(self, multicallable: Any) -> None:
        # The fields grpc.aio's own UnaryUnaryCall is built from.
        self._channel = multicallable._channel  # cygrpc.AioChannel
        self._method: bytes = multicallable._method
        self._handle: int = multicallable._registered_call_handle
        self._serialize = multicallable._request_serializer
        self._deserialize = multicallable._response_deserializer
        self._active = multicallable._python_channel._active_calls  # what close(grace) waits for, then cancels
        #: grpc.aio's multicallable, for what the fast path does not do.
        self.fallback = multicallable

    def __call__(
        self, request: Any, *, timeout: float | None = None, metadata: Any = None,
        credentials: grpc.CallCredentials | None = None, wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
    ) -> Any:  # fmt: skip
        """Send one attempt, as grpc.aio's ``UnaryUnaryMultiCallable.__call__``."""
        if credentials is not None or compression is not None or not available:
            return self.fallback(request, timeout=timeout, metadata=metadata, credentials=credentials,
                                 wait_for_ready=wait_for_ready, compression=compression)  # fmt: skip
        deadline = None if timeout is None else time.time() + timeout
        try:
            call = self._channel.call(self._method, deadline, None, wait_for_ready, self._handle)
        except TypeError:  # another grpc's Cython channel: stop using it (its errors name closed channels etc.)
            _disable("grpc's Cython channel did not take a unary call's arguments")
            return self.fallback(request, timeout=timeout, metadata=metadata, credentials=credentials,
                                 wait_for_ready=wait_for_ready, compression=compression)  # fmt: skip
        payload = request if self._serialize is None else self._serialize(request)
        attempt = UnaryAttempt(call, self._deserialize, payload, tuple(metadata) if metadata else ())
        self._active.add(attempt)
        return attempt


def _disable(why: str) -> None:
    global available
    if available:
        available = False
        _LOGGER.warning("%s: using grpc.aio's calls", why)


def lean_unary(multicallable: Any) -> Any:
    """``multicallable`` (grpc.aio, unary-unary) as a :class:`LeanUnary`, or itself where that cannot work."""
    if not available:
        return multicallable
    try:
        return multicallable if multicallable._interceptors else LeanUnary(multicallable)
    except AttributeError:  # grpc.aio laid out otherwise: keep its own calls
        _disable("grpc.aio's unary multicallable is laid out otherwise")
        return multicallable


class UnaryAttempt:
    """One unary attempt in flight (see the module docstring); awaitable like grpc.aio's unary call."""

    __slots__ = ("__weakref__", "_awaited", "_batch", "_call", "_coro", "_deserialize", "_raised", "_reply")

    def __init__(self, call: Any, deserialize: Callable[[bytes], Any] | None, payload: bytes,
                 metadata: tuple[Any, ...]) -> None:  # fmt: skip
        self._call = call
        self._deserialize = deserialize
        self._awaited = False  # a task is suspended on the batch and resumes the coroutine itself
        self._reply: Any = None  # the serialized response, once landed
        self._raised: BaseException | None = None  # what the coroutine raised other than a status
        self._coro: Any = call.unary_unary(payload, metadata, _census())
        try:
            # Runs the coroutine to its one suspension: the batch is started in grpc's core.
            self._batch: Any = self._coro.send(None)
        except BaseException as exc:  # the core refused the batch (e.g. metadata it cannot send)
            self._coro = self._batch = None
            self._failed(exc)
        else:
            self._batch.add_done_callback(self._landed)

    # -- completion ------------------------------------------------------------------------

    def _landed(self, _: Any) -> None:
        """The batch completed and no task awaits the attempt (one that does takes this callback off): finish it."""
        if self._coro is not None:  # an await that found the batch done may have finished it already
            self._finish()

    def _finish(self) -> None:
        """Resume the coroutine past its completed batch (a callback's path: rare, or one per unawaited call)."""
        coro, self._coro, self._batch = self._coro, None, None
        try:
            coro.send(None)
        except StopIteration as stop:
            self._reply = stop.value
        except asyncio.CancelledError:  # the batch future was cancelled: so is the call
            self.cancel()
        except BaseException as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        if self._call.is_locally_cancelled():
            return  # cancelled first (its batch then fails): the outcome is the cancellation
        self._raised = exc
        self.cancel()  # the call gets a status (CANCELLED) and its waiters wake; the error is re-raised

    def __await__(self) -> Generator[Any, None, Any]:
        batch = self._batch
        if batch is not None and not self._awaited:
            if batch.done():
                self._finish()
            else:
                # This task resumes the coroutine: the done-callback that finishes an
                # unawaited attempt goes (it would cost a loop callback a call).
                self._awaited = True
                batch.remove_done_callback(self._landed)
                batch._asyncio_future_blocking = True
                try:
                    yield batch
                except BaseException as exc:  # the awaiting task was cancelled (the batch future with it)
                    coro, self._coro, self._batch = self._coro, None, None
                    try:
                        coro.throw(exc)
                    except BaseException:  # noqa: BLE001 - the coroutine ends; the call's status says how
                        pass
                    self.cancel()
                    raise
                coro, self._coro, self._batch = self._coro, None, None
                try:
                    self._reply = yield from coro.__await__()
                except BaseException as exc:
                    self._failed(exc)
        elif batch is not None:  # another task resumes it: wait for the status
            yield from self._call.status().__await__()
        if self._raised is None and self._call.is_ok():
            deserialize = self._deserialize
            if deserialize is None:
                return self._reply
            try:
                return deserialize(self._reply)
            except Exception:  # as grpc does: logged, and the response is None
                _LOGGER.exception("Exception deserializing message!")
                return None
        self._fail()

    def _fail(self) -> NoReturn:
        """Raise how the attempt failed: its own exception, the local cancellation, or its status."""
        if self._raised is not None:
            raise self._raised
        if self._call.is_locally_cancelled():
            raise asyncio.CancelledError()
        raise self._error()

    def _error(self) -> grpc.aio.AioRpcError:
        call = self._call
        status = call._status
        return grpc.aio.AioRpcError(
            _CODES[status.code()], _Metadata.from_tuple(call._initial_metadata),
            _Metadata.from_tuple(status.trailing_metadata()), details=status.details(),
            debug_error_string=status.debug_error_string(),
        )  # fmt: skip

    # -- grpc.aio.Call ------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Cancel the attempt; False if it had ended."""
        if self._call.done():
            return False
        self._call.cancel(_CANCELLED)
        return True

    def cancelled(self) -> bool:
        """Whether the attempt ended cancelled (not by a failure of its own, which cancels it in grpc)."""
        return self._raised is None and bool(self._call.cancelled())

    def done(self) -> bool:
        """Whether the attempt has a status."""
        return bool(self._call.done())

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline, or None without one."""
        return self._call.time_remaining()  # type: ignore[no-any-return]

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """Run ``callback(attempt)`` once the attempt has a status."""
        self._call.add_done_callback(functools.partial(callback, self))

    async def initial_metadata(self) -> grpc.aio.Metadata:
        """Metadata the server sent first."""
        return _Metadata.from_tuple(await self._call.initial_metadata())

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        """Metadata the server sent with its status."""
        return _Metadata.from_tuple((await self._call.status()).trailing_metadata())

    async def code(self) -> grpc.StatusCode:
        """The attempt's status code."""
        return _CODES[(await self._call.status()).code()]

    async def details(self) -> str:
        """The attempt's status details."""
        return (await self._call.status()).details()  # type: ignore[no-any-return]

    async def debug_error_string(self) -> str:
        """grpc's debug string of the status."""
        return (await self._call.status()).debug_error_string()  # type: ignore[no-any-return]

    async def wait_for_connection(self) -> None:
        """Wait for the attempt to end; raise its error if it failed (as grpc.aio's unary call does)."""
        await self._call.status()
        if self._raised is not None or not self._call.is_ok():
            self._fail()
