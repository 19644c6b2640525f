"""An RDMA requester: READ, WRITE and atomics on a remote ``hm-agent``'s MRs.

>>> keys = CurveKeys.load("/etc/hmmirror/keys/nic0.key", "/etc/hmmirror/keys/me.key_secret")
>>> async with RdmaPeer.connect("tcp://10.231.0.2:18515", curve=keys) as peer:
...     data = await peer.read(rkey, addr, 4096)
...     old = await peer.fetch_add(rkey, counter_addr, 1)

A ``tcp://`` agent admits only requesters whose public key is in its allow-list
(``curve``: the agent's public certificate and the requester's own secret one);
a request that times out after a refused handshake says so (DaemonUnavailable).

Failures raise the model's errors: ``RemoteAccessError`` for a bad rkey, an
access outside the MR or a missing right; ``DeviceError`` with EPERM (a page
the target maps read-only), EFAULT (an unmapped page), EBUSY or ESRCH;
``RequestTimeout`` when the agent does not answer within the deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import zmq
from hmmirror.client.channel import Channel, R, Unsent
from hmmirror.client.curve import CurveKeys
from hmmirror.client.errors import (
    AgentError,
    DaemonUnavailable,
    RemoteError,
    RequestTimeout,
    device_error,
)
from hmmirror.proto.messages import (
    STAT_MR_COLUMNS,
    AtomicOp,
    AtomicReply,
    Goodbye,
    Message,
    Ok,
    RdmaAtomic,
    RdmaRead,
    RdmaReadReply,
    RdmaWrite,
    StatMr,
    StatMrReply,
)
from hmmirror.transport.sockets import HWM

#: The requests that change nothing at the agent: a timeout of one has no effect to fear.
_READ_ONLY = (RdmaRead, StatMr)
#: How long closing waits for the agent's answer to ``goodbye`` (seconds).
GOODBYE_WAIT = 0.5


class RdmaPeer(Channel):
    """A connection to one ``hm-agent``'s RDMA service."""

    what = "hm-agent"
    #: The socket-monitor events that say whether the agent admitted us.
    _HANDSHAKE = {
        int(zmq.EVENT_HANDSHAKE_SUCCEEDED): "",
        int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "the handshake failed",
        int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "the security mechanisms differ (CURVE or not)",
        int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "our key is not in its allow-list",
    }

    def __init__(self, endpoint: str, timeout: float, curve: CurveKeys | None = None) -> None:
        super().__init__(endpoint, timeout, curve)
        self._monitor = self._monitored()
        self._refused = ""

    def _monitored(self) -> zmq.Socket[Any]:
        """A monitor of the socket: the handshake's outcome."""
        events = 0
        for event in self._HANDSHAKE:
            events |= event
        return self.sock.get_monitor_socket(events)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, endpoint: str, *, timeout: float = 15.0, curve: CurveKeys | None = None
    ) -> AsyncIterator[RdmaPeer]:
        """Connect to the agent at ``endpoint`` (with ``curve`` keys for a CURVE listener);
        say goodbye and close on exit."""
        peer = cls(endpoint, timeout, curve)
        try:
            yield peer
        finally:
            try:
                await peer.goodbye()
            finally:
                peer.close()

    async def goodbye(self) -> None:
        """Tell the agent this connection is done, so that its place comes back at once
        (SPEC §4.7): at most ``GOODBYE_WAIT`` for the answer, which may be an error (an
        agent older than 1.2 does not know ``goodbye``); nothing to say if never connected."""
        if self._closed or self.lost is not None or not self._dialer.ready:
            return
        with contextlib.suppress(AgentError):
            await self.request(Goodbye(), timeout=GOODBYE_WAIT)

    def close(self) -> None:
        """Close the connection; requests still waiting fail."""
        self._unmonitor()
        self._close_socket()

    def _unmonitor(self) -> None:
        if not self._monitor.closed:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self._monitor.close(linger=0)

    def _handshake_refused(self) -> str:
        """Why the agent refused our last handshake ("" if it did not, or we cannot tell)."""
        while not self._monitor.closed:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = int.from_bytes(frames[0][:2], "little")
            self._refused = self._HANDSHAKE.get(event, self._refused)
        return self._refused

    def _closed_by_agent(self) -> bool:
        """Whether a request our socket refused (``Unsent``) was refused because the agent
        had closed the connection: fewer requests are unanswered than the send queue holds,
        so it was not full but had no peer at all."""
        return not self._closed and self._dialer.ready and len(self._pending) < HWM

    async def _knock_again(self) -> None:
        """The agent closed this connection (a ``goodbye``, or it took the place back after
        a long silence, SPEC §4.7): a new one, watched like the first."""
        self._unmonitor()
        await self.redial()
        if self._closed:  # closed while it knocked
            raise DaemonUnavailable(f"connection to {self.endpoint} closed")
        self._monitor = self._monitored()

    async def _ask(
        self, msg: Message, expect: type[R], bulk: Any = (), copy: bool = True
    ) -> tuple[R, tuple[memoryview, ...]]:
        """One request and its reply (of type ``expect``) and bulk, with the agent's error
        replies raised as the model's errors. A request that could not leave because the
        agent had closed the connection goes again, once, on a new one."""
        sock = self.sock
        try:
            return await self._exchange(msg, expect, bulk, copy)
        except Unsent:
            if not self._closed_by_agent():
                raise
        # The first request to find the connection gone knocks (``redial`` replaces the
        # socket before it awaits anything); the others go on the new one, whose dial
        # they then share.
        if self.sock is sock:
            await self._knock_again()
        return await self._exchange(msg, expect, bulk, copy)

    async def _exchange(
        self, msg: Message, expect: type[R], bulk: Any, copy: bool
    ) -> tuple[R, tuple[memoryview, ...]]:
        """``exchange`` with the agent's errors raised as the model's."""
        try:
            return await self.exchange(msg, expect, bulk, copy=copy)
        except RemoteError as exc:
            raise device_error(exc) from exc
        except RequestTimeout as exc:
            why = self._handshake_refused()
            if why:
                raise DaemonUnavailable(
                    f"{self.what} at {self.endpoint} refused the connection: {why}"
                ) from exc
            if isinstance(msg, _READ_ONLY):  # "it may have taken effect" would mislead
                raise RequestTimeout(
                    f"no reply to {msg.TYPE} from {self.what} at {self.endpoint} in "
                    f"{self.timeout:g} s (a read: nothing was changed); is the agent running, "
                    "and its endpoint, and our key in its allow-list, right?"
                ) from exc
            raise

    async def read(self, rkey: int, addr: int, length: int) -> memoryview:
        """RDMA READ: ``length`` bytes at ``addr`` of ``rkey`` (a view of the received frame)."""
        _, bulk = await self._ask(RdmaRead(rkey=rkey, addr=addr, length=length), RdmaReadReply)
        return bulk[0]

    async def write(self, rkey: int, addr: int, data: bytes | bytearray | memoryview) -> None:
        """RDMA WRITE: ``data`` at ``addr`` of ``rkey``."""
        view = memoryview(data).cast("B")
        msg = RdmaWrite(rkey=rkey, addr=addr, length=len(view))
        await self._ask(msg, Ok, [view], copy=False)

    async def compare_swap(self, rkey: int, addr: int, compare: int, swap: int) -> int:
        """ATOMIC compare-and-swap of the u64 at ``addr``; return the value found."""
        msg = RdmaAtomic(
            rkey=rkey, addr=addr, op=int(AtomicOp.CMP_SWAP), compare_add=compare, swap=swap
        )
        return (await self._ask(msg, AtomicReply))[0].old

    async def fetch_add(self, rkey: int, addr: int, add: int) -> int:
        """ATOMIC fetch-and-add on the u64 at ``addr`` (modulo 2^64); return the value found."""
        msg = RdmaAtomic(rkey=rkey, addr=addr, op=int(AtomicOp.FETCH_ADD), compare_add=add)
        return (await self._ask(msg, AtomicReply))[0].old

    async def stat_mr(self) -> tuple[str, list[dict[str, int]]]:
        """The agent's device name and one row per MR granted to us (``STAT_MR_COLUMNS``)."""
        reply, _ = await self._ask(StatMr(), StatMrReply)
        width = len(STAT_MR_COLUMNS)
        rows = reply.rows
        return reply.device, [
            dict(zip(STAT_MR_COLUMNS, rows[i : i + width], strict=True))
            for i in range(0, len(rows) - width + 1, width)
        ]
