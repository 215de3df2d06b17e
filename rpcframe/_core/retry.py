"""Retry policy: a value that says whether, and after how long, to try again.

The policy never sleeps; :func:`decide` returns a :class:`Verdict` (retry or
not, the delay, and why) and the client front waits as it knows how. What may
be retried comes from the contract:

================================  =====================================
the failed attempt                retried when
================================  =====================================
never ran: no endpoint had a      always (any method), at once, on another
connection, or the server said    endpoint; bounded by ``failover_attempts``
so (:data:`NOT_RUN_KEY`)
was sent, retryable status        only ``NO_SIDE_EFFECTS`` / ``IDEMPOTENT``
                                  methods, with backoff, under the budget
was sent, other status            never
incoming call was a retry         never (chain stop), except never-sent
================================  =====================================

"Never ran" is decided only from facts the client can trust: its own pick
(grpc reported no connection, so nothing was sent) or the marker rpcframe's
server wrapper puts on calls it ended before their handler started. Status
details are never read: a server's text is not evidence about this call.

Pure: status codes are their names (``"UNAVAILABLE"``), randomness and time
come in as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .errors import ConfigError

__all__ = ["DEFAULT_RETRYABLE", "NOT_RUN_KEY", "PUSHBACK_KEY", "RetryPolicy", "Verdict", "decide", "parse_pushback"]

#: Trailing metadata rpcframe's server sets on a call it ended before the
#: handler started (shutting down, or over its limits): the client may send
#: it elsewhere whatever the method. The server removes it from anything a
#: handler returns, so a relay cannot pass on a downstream's marker.
NOT_RUN_KEY = "rpcframe-not-run"

#: Trailing metadata with the milliseconds a server asks a client to wait before retrying (gRFC A6).
PUSHBACK_KEY = "grpc-retry-pushback-ms"

DEFAULT_RETRYABLE = frozenset({"UNAVAILABLE"})

_KNOWN_CODES = frozenset(
    {
        "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
        "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a sent call is tried again (gRFC A6 semantics, client-side).

    Attributes:
        max_attempts: attempts in all, the first included (1 turns retries off).
        initial_backoff: seconds; the n-th retry waits a random time in
            ``[0, min(initial_backoff * multiplier**(n-1), max_backoff)]``
            ("full jitter", so retries of many clients spread out).
        max_backoff: cap of the backoff, seconds.
        backoff_multiplier: growth of the backoff per retry.
        retryable_codes: status names that may be retried, for methods the
            contract marks ``NO_SIDE_EFFECTS`` or ``IDEMPOTENT``.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    backoff_multiplier: float = 2.0
    retryable_codes: frozenset[str] = DEFAULT_RETRYABLE

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ConfigError("backoffs must satisfy 0 <= initial_backoff <= max_backoff")
        if self.backoff_multiplier < 1:
            raise ConfigError(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier!r}")
        codes = frozenset(c.upper() for c in self.retryable_codes)
        unknown = codes - _KNOWN_CODES
        if unknown:
            raise ConfigError(f"unknown status code(s) in retryable_codes: {', '.join(sorted(unknown))}")
        object.__setattr__(self, "retryable_codes", codes)

    def backoff(self, retry: int, rand: float) -> float:
        """Seconds to wait before the ``retry``-th retry (1-based); ``rand`` in [0, 1)."""
        ceiling = self.initial_backoff * self.backoff_multiplier ** (retry - 1)
        return rand * (ceiling if ceiling < self.max_backoff else self.max_backoff)


#: No retries after a call was sent (never-sent failover still applies).
NO_RETRY = RetryPolicy(max_attempts=1)


class Verdict(NamedTuple):
    """A retry decision: whether, after how many seconds, and why (for errors and logs)."""

    retry: bool
    delay: float
    reason: str


def parse_pushback(value: str | bytes | None) -> float | None:
    """Server pushback (``grpc-retry-pushback-ms``) in seconds; negative = do not retry."""
    if value is None:
        return None
    try:
        ms = int(value)
    except ValueError:
        return -1.0  # gRFC A6: a malformed pushback means "do not retry"
    return ms / 1000.0 if ms >= 0 else -1.0


def decide(
    policy: RetryPolicy,
    *,
    attempt: int,
    code: str,
    idempotent: bool,
    chain_stop: bool,
    pushback: float | None,
    remaining: float | None,
    rand: float,
) -> Verdict:
    """Whether a sent attempt that failed with ``code`` is tried again.

    ``attempt`` counts the attempts made so far (1 after the first);
    ``remaining`` is the deadline's time left in seconds (``None``: no
    deadline). The retry budget is checked by the caller, last, so a refused
    retry never spends it.
    """
    if code not in policy.retryable_codes:
        return Verdict(False, 0.0, f"{code} is not retryable")
    if not idempotent:
        return Verdict(False, 0.0, "the method is not marked NO_SIDE_EFFECTS or IDEMPOTENT")
    if attempt >= policy.max_attempts:
        return Verdict(False, 0.0, f"{attempt} attempts made")
    if chain_stop:
        return Verdict(False, 0.0, "the incoming call was itself a retry")
    if pushback is not None and pushback < 0:
        return Verdict(False, 0.0, "the server pushed back")
    delay = pushback if pushback is not None else policy.backoff(attempt, rand)
    if remaining is not None and delay >= remaining:
        return Verdict(False, 0.0, "no time left before the deadline")
    return Verdict(True, delay, "retrying")
