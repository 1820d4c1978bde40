"""Connection limits for the agent's HTTP server, below the ASGI app where requests cannot reach.

uvicorn closes idle keep-alive connections and caps requests in progress, but it gives a
connection that sends half a request all the time it wants, and it accepts connections until
the process runs out of file descriptors. The protocol here (uvicorn's h11 protocol, extended)
adds what a server on an open network needs:

- a header deadline: a request's headers must be complete within `header_timeout_s` of the
  connection opening (or of the previous answer on a kept-alive connection);
- a body deadline: an upload that stalls for `body_timeout_s` is answered 408 and closed;
- a cap on open connections, and a smaller one on connections that have not yet shown the
  token. When the unauthenticated cap is reached, the oldest such connection is closed to make
  room: strangers can only push each other out, never a client that holds the token, which
  sends its headers as soon as it connects.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the agent holds, and how long it waits for each part of a request."""

    max_connections: int = 64
    max_unauthenticated: int = 16
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5
    # h11 refuses (400) a request whose line and headers outgrow this; a profile header is ~2 KiB.
    max_header_bytes: int = 32 * 1024

    def check(self) -> None:
        """Raises ConfigError naming the first option out of range."""
        numbers = {
            "--max-connections": self.max_connections,
            "--max-unauthenticated": self.max_unauthenticated,
            "--header-timeout-s": self.header_timeout_s,
            "--body-timeout-s": self.body_timeout_s,
            "--keep-alive-s": self.keep_alive_s,
        }
        for option, value in numbers.items():
            if not value > 0:
                raise ConfigError(f"{option} must be positive, got {value}")
        if self.max_unauthenticated >= self.max_connections:
            raise ConfigError(
                f"--max-unauthenticated ({self.max_unauthenticated}) must be below "
                f"--max-connections ({self.max_connections}), to leave room for clients with "
                "the token"
            )


def bearer_matches(headers: Iterable[tuple[bytes, bytes]], token: bytes) -> bool:
    """True when the (lower-cased) headers carry `Authorization: Bearer <token>`."""
    given = dict(headers).get(b"authorization", b"")
    scheme, _, value = given.partition(b" ")
    # compare_digest takes time independent of where the strings differ
    return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token)


class ConnectionGate:
    """The open connections of one server, and which of them have not shown the token yet.

    Runs on the event loop's thread only (protocol callbacks), so it needs no lock.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: set[Any] = set()
        self.unauthenticated: dict[Any, None] = {}  # insertion order: the oldest first
        self.refused = 0
        self.evicted = 0

    def admit(self, conn: Any) -> bool:
        """Count a new connection in; False when it must be refused (every slot is taken by
        connections that showed the token)."""
        if len(self.open) >= self.limits.max_connections and not self._evict_oldest():
            self.refused += 1
            return False
        if len(self.unauthenticated) >= self.limits.max_unauthenticated:
            self._evict_oldest()
        self.open.add(conn)
        self.unauthenticated[conn] = None
        return True

    def authenticated(self, conn: Any) -> None:
        self.unauthenticated.pop(conn, None)

    def release(self, conn: Any) -> None:
        self.open.discard(conn)
        self.unauthenticated.pop(conn, None)

    def _evict_oldest(self) -> bool:
        if not self.unauthenticated:
            return False
        oldest = next(iter(self.unauthenticated))
        self.release(oldest)
        oldest.drop()
        self.evicted += 1
        return True


def _raw_answer(status: int, reason: str, detail: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, written beside h11: it goes out
    when h11 cannot answer (no request yet) and the connection closes right after."""
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def guarded_protocol(limits: ConnectionLimits, token: str) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the deadlines and caps of `limits`, for `uvicorn.run(http=)`.

    Each call makes a new class with its own gate: the connections of one server.
    """
    gate = ConnectionGate(limits)
    secret = token.encode()

    class GuardedH11Protocol(_GuardedH11Protocol):
        _gate = gate
        _limits = limits
        _secret = secret

    return GuardedH11Protocol


class _GuardedH11Protocol(H11Protocol):
    _gate: ConnectionGate
    _limits: ConnectionLimits
    _secret: bytes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._gate.admit(self):
            detail = "the agent has no free connection; retry shortly"
            transport.write(_raw_answer(503, "Service Unavailable", detail))
            self._forget()
            transport.close()
            return
        self._update_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._gate.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        self._after_events(cycle)

    def on_response_complete(self) -> None:
        cycle = self.cycle  # a pipelined request may start in here
        super().on_response_complete()
        self._after_events(cycle)

    def _after_events(self, cycle: Any) -> None:
        """A new request's headers arrived when the cycle changed: note whether they carry
        the token (the app checks it again), then arm the deadline of the new phase."""
        if self.cycle is not cycle and bearer_matches(self.headers, self._secret):
            self._gate.authenticated(self)
        self._update_deadline()

    def drop(self) -> None:
        """Close at once (the gate needs the room)."""
        self._cancel_deadline()
        self._forget()
        self.transport.abort()

    def _forget(self) -> None:
        """Leave uvicorn's count of connections now, not when the loop reports the close:
        its `limit_concurrency` counts them, and a burst of closes would turn clients away."""
        self.connections.discard(self)

    # ------------------------------------------------------------------ deadlines

    def _update_deadline(self) -> None:
        """Arm the deadline of the phase the connection is in.

        Waiting for headers: a fixed deadline from the start of the wait (a trickle of bytes
        does not extend it). Reading a body: an idle deadline, re-armed by every byte. While
        the app works on a complete request there is none (the job timeout bounds the work).
        """
        if self.transport.is_closing():
            return
        their = self.conn.their_state
        if their is h11.SEND_BODY:
            self._arm("body", self._limits.body_timeout_s)
        elif their is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
            if self._phase != "headers":
                self._arm("headers", self._limits.header_timeout_s)
        else:
            self._cancel_deadline()

    def _arm(self, phase: str, seconds: float) -> None:
        self._cancel_deadline()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, ""

    def _expired(self) -> None:
        phase = self._phase
        self._deadline, self._phase = None, ""
        if self.transport.is_closing():
            return
        if phase == "body" and self.flow.read_paused:
            # The app is the slow side (reads are paused while it writes): not the client's fault.
            self._arm("body", self._limits.body_timeout_s)
            return
        if phase == "headers" and self.conn.trailing_data[0]:
            limit = self._limits.header_timeout_s
            detail = f"the request's headers did not arrive within {limit:g} s"
            self.transport.write(_raw_answer(408, "Request Timeout", detail))
        elif phase == "body" and not (self.cycle and self.cycle.response_started):
            limit = self._limits.body_timeout_s
            detail = f"the request's body stalled: no byte for {limit:g} s"
            self.transport.write(_raw_answer(408, "Request Timeout", detail))
        # Nothing sent yet (an idle connection), or an answer already under way: just close.
        self.transport.close()
