"""Hostile input on a live hmmd's socket, case by case, while a real agent keeps mirroring.

``test_bad_input.py`` floods a daemon with 10,000 seeded frames and checks it
survives. This file checks each kind of bad input *precisely*, against the
conftest ``hmmd``: malformed multipart messages, wrong versions, truncated
bulk frames, absurd ranges (start > end, unaligned, beyond user space, past
2^64) and requests out of order for the session's state. For each case:

* the answer is an ``error`` with the expected code, and its ``re`` names the
  request whenever the header could be read (SPEC §1.4), so the sender's
  pending request fails at once instead of timing out;
* ``bad_messages`` grows by exactly one for input the daemon counts as bad
  (undecodable, needing a session, EINVAL or TOO_LARGE) and not at all for the others,
  and the Prometheus ``/metrics`` endpoint says the same as ``status``;
* hmmd is still running;
* a well-behaved agent (the client library, on a real puppet target) then
  receives the next invalidation of its mirror, exactly, and acks it.

A second test sends seeded random frame sets (bounded in count and time) while
the well-behaved agent keeps receiving invalidations, and checks that none of
them was lost and that hmmd still serves a fresh session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from hmmirror.client import Access, Event
from hmmirror.proto import PROTOCOL_VERSION, ErrorCode, ProtocolError, decode, encode
from hmmirror.proto import messages as M
from hmmirror.proto.codec import Envelope
from hmmirror.proto.entries import HMM_PFN_VALID, HMM_PFN_WRITE
from hmmirror.proto.schema import U64_MAX
from hmmirror.transport import dial

PAGE = 4096
#: Pages the well-behaved agent mirrors.
NPAGES = 4
REPLY_TIMEOUT = 5.0
#: The random phase: at most this many frame sets, for at most this long.
RANDOM_FRAMES = 1500
RANDOM_SECONDS = 15.0
SEED = 0x46555A5A  # "FUZZ"
PID_MAX_EVER = 1 << 22  # no process can have a larger pid

# A lease of 3 s: the raw peers here do not heartbeat, and a loaded 2-vCPU machine can
# stall a peer past the conftest's 0.6 s lease between two requests.
pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.hmmd_args("--heartbeat", "1s", "--metrics", "127.0.0.1:0"),
]


# --- a raw peer -----------------------------------------------------------------------------


class RawPeer:
    """A DEALER that sends whatever frames it is given and matches replies by ``re``.

    Replies with ``re = 0`` (undecodable requests) are kept in order in ``anonymous``.
    INVALIDATEs are acked at once, so a session of this peer never stalls anyone.
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = dial(ctx, endpoint)
        self.next_id = 100
        self.waiting: dict[int, asyncio.Future[Envelope]] = {}
        self.anonymous: asyncio.Queue[Envelope] = asyncio.Queue()
        self.undecodable: list[str] = []
        self.reader = asyncio.ensure_future(self._read())

    def take_id(self) -> int:
        """A fresh header id."""
        self.next_id += 1
        return self.next_id

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                env = decode(frames)
            except ProtocolError as exc:
                self.undecodable.append(str(exc))
                continue
            if isinstance(env.msg, M.Invalidate):
                await self.sock.send_multipart(encode(M.Ack(n=env.msg.n), self.take_id()))
                continue
            fut = self.waiting.pop(env.re, None) if env.re else None
            if fut is not None and not fut.done():
                fut.set_result(env)
            elif env.re == 0:
                self.anonymous.put_nowait(env)

    async def send(self, frames: Sequence[Any], re: int) -> Envelope:
        """Send ``frames``; return the reply naming ``re`` (or the next anonymous one if 0)."""
        if re:
            fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
            self.waiting[re] = fut
        await self.sock.send_multipart(list(frames))
        try:
            if re:
                return await asyncio.wait_for(fut, REPLY_TIMEOUT)
            return await asyncio.wait_for(self.anonymous.get(), REPLY_TIMEOUT)
        except TimeoutError:
            raise TimeoutError(f"no reply naming re={re} in {REPLY_TIMEOUT} s") from None
        finally:
            self.waiting.pop(re, None)

    async def request(self, msg: M.Message, bulk: Sequence[Any] = ()) -> Envelope:
        """Send a valid message and return its reply."""
        msg_id = self.take_id()
        return await self.send(encode(msg, msg_id, bulk=bulk), msg_id)

    async def status(self) -> dict[str, Any]:
        """The daemon's status figures."""
        env = await self.request(M.Status())
        assert isinstance(env.msg, M.StatusReply), env
        return dict(env.msg.stats)

    def close(self) -> None:
        """Stop reading and close the socket."""
        self.reader.cancel()
        self.sock.close(linger=0)


@contextlib.asynccontextmanager
async def raw_peers(endpoint: str) -> Any:
    """``async with raw_peers(ep) as make``: ``make()`` gives a RawPeer; all closed after."""
    ctx = zmq.asyncio.Context()
    peers: list[RawPeer] = []

    def make() -> RawPeer:
        peer = RawPeer(ctx, endpoint)
        peers.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in peers:
            peer.close()
        await asyncio.sleep(0)  # let the cancelled readers finish before the context goes
        ctx.term()


async def scrape_metrics(url: str) -> dict[str, float]:
    """GET the Prometheus endpoint; return its samples by name."""
    host, _, rest = url.removeprefix("http://").partition(":")
    port = int(rest.split("/", 1)[0])
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), REPLY_TIMEOUT)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: hmmd\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), REPLY_TIMEOUT)
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            samples[name] = float(value)
    return samples


# --- the well-behaved agent -----------------------------------------------------------------


class Witness:
    """A client-library agent mirroring NPAGES pages of a puppet, and the invalidations
    an announcer session sends it: ``check()`` invalidates one page and verifies that the
    mirror received exactly that invalidation, and nothing else since the last check."""

    def __init__(self, mirror: Any, announcer: Any, pid: int, addr: int) -> None:
        self.mirror, self.announcer, self.pid, self.addr = mirror, announcer, pid, addr
        self.expected: list[tuple[int, int, Event]] = []
        self.rounds = 0

    async def check(self, start: int | None = None, end: int | None = None) -> None:
        """One invalidation through (by default of the next page in turn), checked exactly."""
        if start is None or end is None:
            start = self.addr + (self.rounds % NPAGES) * PAGE
            end = start + PAGE
        self.rounds += 1
        await self.mirror.fault(self.addr, NPAGES)
        await asyncio.wait_for(
            self.announcer.sync_range(self.pid, start, end, Event.CLEAR), REPLY_TIMEOUT
        )
        lo, hi = max(start, self.addr), min(end, self.addr + NPAGES * PAGE)
        self.expected.append((lo, hi, Event.CLEAR))
        got = self.mirror.events
        assert got == self.expected, (
            f"the well-behaved agent's invalidations differ after round {self.rounds}: "
            f"expected {self.expected[-3:]} (of {len(self.expected)}), got {got[-3:]} "
            f"(of {len(got)})"
        )
        assert self.mirror.dropped is None, self.mirror.dropped


@contextlib.asynccontextmanager
async def witness(agent: Callable[..., Any], puppet: Any) -> Any:
    """A Witness on a fresh NPAGES mapping of ``puppet``; its sessions closed afterwards."""
    addr = await puppet.mmap(NPAGES * PAGE)
    await puppet.write(addr, b"w" * NPAGES * PAGE)
    async with agent(name="witness") as session, agent(name="announcer") as announcer:
        mirror = await session.mirror(puppet.pid, addr, NPAGES * PAGE, Access.READ | Access.WRITE)
        w = Witness(mirror, announcer, puppet.pid, addr)
        await w.check()
        yield w


# --- frames ---------------------------------------------------------------------------------


def frames_of(header: Any, body: Any, *bulk: bytes) -> list[bytes]:
    """Hand-made frames: the delimiter, a packed header and body, and raw bulk frames."""
    return [b"", msgpack.packb(header), msgpack.packb(body), *bulk]


def head(mtype: str, msg_id: int, v: Any = None) -> dict[str, Any]:
    """A header map."""
    return {"v": list(PROTOCOL_VERSION) if v is None else v, "type": mtype, "id": msg_id}


def body_of(msg: M.Message) -> dict[str, Any]:
    """The body map ``encode`` would send for ``msg``."""
    bulk = [bytes(n) for n in msg.bulk_sizes()]
    return dict(msgpack.unpackb(encode(msg, 1, bulk=bulk)[2]))


@dataclass
class Case:
    """One hostile input: how to build it, and what hmmd must answer and count."""

    name: str
    build: Callable[[int], list[bytes]]
    """Frames for header id ``msg_id``."""
    code: ErrorCode
    bad: bool
    """Whether ``bad_messages`` must count it."""
    named: bool = True
    """Whether the header is readable, so the reply's ``re`` must be the request's id."""


@dataclass
class State:
    """What the session-state cases refer to."""

    pid: int
    addr: int
    mirror: int
    others_mirror: int


def decode_cases() -> list[Case]:
    """Malformed frames, versions, types and bulk frames: refused before any handler."""
    hello = body_of(M.Hello(agent="fuzz", pid=1))
    read2 = body_of(M.DmaRead(mirror=1, start=0, npages=2))
    write1 = body_of(M.DmaWrite(mirror=1, start=0, npages=1))
    fault = body_of(M.Fault(mirror=1, start=0, npages=1, write=False, mode=1))
    E = ErrorCode
    return [
        # malformed multipart
        Case("one frame", lambda i: [b""], E.BAD_MESSAGE, True, named=False),
        Case("two frames", lambda i: frames_of(head("hello", i), hello)[:2], E.BAD_MESSAGE, True,
             named=False),
        Case("no delimiter", lambda i: [b"x", *frames_of(head("hello", i), hello)[1:]],
             E.BAD_MESSAGE, True, named=False),
        Case("header not msgpack", lambda i: [b"", b"\xc1\xc1", b"\x80"], E.BAD_MESSAGE, True,
             named=False),
        Case("header an array", lambda i: frames_of([1, 0, "hello", i], hello), E.BAD_MESSAGE,
             True, named=False),
        Case("header over 512 bytes", lambda i: frames_of(head("hello", i) | {"x": "y" * 600},
             hello), E.TOO_LARGE, True, named=False),
        Case("body not a map", lambda i: frames_of(head("hello", i), [1, 2]), E.BAD_MESSAGE, True),
        Case("body not msgpack", lambda i: [*frames_of(head("hello", i), {})[:2], b"\xc1"],
             E.BAD_MESSAGE, True),
        Case("body field of the wrong type", lambda i: frames_of(head("hello", i), {"agent": 5}),
             E.BAD_MESSAGE, True),
        Case("extra frame after hello", lambda i: [*frames_of(head("hello", i), hello), b""],
             E.BAD_MESSAGE, True),
        # versions
        Case("major 2", lambda i: frames_of(head("hello", i, [2, 0]), hello), E.VERSION_MISMATCH,
             True),
        Case("major 0", lambda i: frames_of(head("hello", i, [0, 9]), hello), E.VERSION_MISMATCH,
             True),
        Case("version a string", lambda i: frames_of(head("hello", i, "1.0"), hello),
             E.BAD_MESSAGE, True, named=False),
        Case("version one number", lambda i: frames_of(head("hello", i, [1]), hello),
             E.BAD_MESSAGE, True, named=False),
        # types
        Case("unknown type", lambda i: frames_of(head("nope", i), {}), E.UNKNOWN_MESSAGE, True),
        Case("getattr bait", lambda i: frames_of(head("__class__", i), {}), E.UNKNOWN_MESSAGE,
             True),
        Case("daemon-only type", lambda i: frames_of(head("invalidate", i),
             {"n": 1, "mirror": 1, "items": []}), E.UNKNOWN_MESSAGE, True),
        # truncated, missing and extra bulk frames
        Case("dma_read entries short", lambda i: frames_of(head("dma_read", i), read2, bytes(15)),
             E.BAD_MESSAGE, True),
        Case("dma_read entries missing", lambda i: frames_of(head("dma_read", i), read2),
             E.BAD_MESSAGE, True),
        Case("dma_write data short", lambda i: frames_of(head("dma_write", i), write1, bytes(8),
             bytes(4095)), E.BAD_MESSAGE, True),
        Case("dma_write extra frame", lambda i: frames_of(head("dma_write", i), write1, bytes(8),
             bytes(4096), b"x"), E.BAD_MESSAGE, True),
        Case("fault with a bulk frame", lambda i: frames_of(head("fault", i), fault, bytes(8)),
             E.BAD_MESSAGE, True),
        # schema-level absurd ranges
        Case("interval start > end", lambda i: frames_of(head("register", i),
             {"pid": 1, "start_time": 0, "intervals": [[8192, 4096]], "access": 1}),
             E.BAD_MESSAGE, True),
        Case("interval empty", lambda i: frames_of(head("register", i),
             {"pid": 1, "start_time": 0, "intervals": [[4096, 4096]], "access": 1}),
             E.BAD_MESSAGE, True),
        Case("address 2^64 (as a float: msgpack has no larger int)", lambda i: frames_of(
             head("fault", i), fault | {"start": float(1 << 64)}), E.BAD_MESSAGE, True),
        Case("npages over the cap", lambda i: frames_of(head("dma_read", i),
             read2 | {"npages": M.MAX_DMA_PAGES + 1}), E.TOO_LARGE, True),
    ]  # fmt: skip


def before_hello_cases(s: State) -> list[Case]:
    """Requests that need a session, from a peer that never said hello."""
    E = ErrorCode
    reg = M.Register(pid=s.pid, start_time=0, intervals=((s.addr, s.addr + PAGE),), access=1)
    return [
        Case("register before hello", lambda i: encode(reg, i), E.NO_SESSION, True),
        Case("ack before hello", lambda i: encode(M.Ack(n=1), i), E.NO_SESSION, True),
        Case("heartbeat before hello", lambda i: encode(M.Heartbeat(), i), E.NO_SESSION, True),
        Case("dma_read before hello", lambda i: encode(
            M.DmaRead(mirror=s.mirror, start=s.addr, npages=1), i, bulk=[bytes(8)]),
            E.NO_SESSION, True),
        Case("goodbye before hello", lambda i: encode(M.Goodbye(), i), E.NO_SESSION, True),
    ]  # fmt: skip


def session_cases(s: State) -> list[Case]:
    """Requests from a live session whose ranges or state make no sense."""
    E = ErrorCode
    valid = (HMM_PFN_VALID | HMM_PFN_WRITE).to_bytes(8, "little")
    top = (1 << 64) - PAGE  # the last page of u64 space: anything after it wraps

    def reg(*intervals: tuple[int, int], pid: int = s.pid) -> Callable[[int], list[bytes]]:
        return lambda i: encode(M.Register(pid=pid, start_time=0, intervals=intervals, access=1), i)

    def fault(start: int, npages: int, mirror: int = s.mirror) -> Callable[[int], list[bytes]]:
        return lambda i: encode(
            M.Fault(mirror=mirror, start=start, npages=npages, write=False, mode=1), i
        )

    def dma_read(start: int, npages: int, mirror: int = s.mirror) -> Callable[[int], list[bytes]]:
        msg = M.DmaRead(mirror=mirror, start=start, npages=npages)
        return lambda i: encode(msg, i, bulk=[valid * npages])

    def sync(ranges: tuple[tuple[int, int], ...], event: int) -> Callable[[int], list[bytes]]:
        return lambda i: encode(M.SyncRange(pid=s.pid, ranges=ranges, event=event), i)

    a = s.addr
    return [
        # register: absurd intervals
        Case("register unaligned", reg((a + 1, a + PAGE + 1)), E.EINVAL, True),
        Case("register end unaligned", reg((a, a + 100)), E.EINVAL, True),
        Case("register beyond user space", reg((1 << 47, (1 << 47) + PAGE)), E.EINVAL, True),
        Case("register at the top of u64", reg((top - PAGE, top)), E.EINVAL, True),
        Case("register overlapping", reg((a, a + 2 * PAGE), (a + PAGE, a + 3 * PAGE)), E.EINVAL,
             True),
        Case("register over 256 GiB", reg((0, 1 << 46)), E.TOO_LARGE, True),
        Case("register pid 0", reg((a, a + PAGE), pid=0), E.EINVAL, True),
        Case("register no such pid", reg((a, a + PAGE), pid=PID_MAX_EVER + 5), E.ESRCH, False),
        # fault and DMA: absurd ranges on a real mirror
        Case("fault unaligned", fault(a + 8, 1), E.EINVAL, True),
        Case("fault of 0 pages", fault(a, 0), E.EINVAL, True),
        Case("fault wrapping past 2^64", fault(top, 2), E.EINVAL, True),
        Case("fault beyond user space", fault(1 << 47, 1), E.EINVAL, True),
        Case("fault outside the mirror", fault(a + NPAGES * PAGE, 1), E.EINVAL, True),
        Case("fault half outside the mirror", fault(a + PAGE, NPAGES), E.EINVAL, True),
        Case("dma_read wrapping past 2^64", dma_read(top, 2), E.EINVAL, True),
        Case("dma_read of 0 pages", dma_read(a, 0), E.EINVAL, True),
        Case("dma_read outside the mirror", dma_read(a - PAGE, 1), E.EINVAL, True),
        Case("dma_write bytes past the pages", lambda i: encode(
            M.DmaWrite(mirror=s.mirror, start=a, npages=1, offset=4000, length=200), i,
            bulk=[valid, bytes(200)]), E.EINVAL, True),
        Case("dma_atomic unaligned", lambda i: encode(
            M.DmaAtomic(mirror=s.mirror, start=a, offset=4, op=1, compare_add=1), i,
            bulk=[valid]), E.EINVAL, True),
        Case("sync_range no range", sync((), 1), E.EINVAL, True),
        Case("sync_range unknown event", sync(((a, a + PAGE),), 200), E.EINVAL, True),
        Case("sync_range announcing RELEASE", sync(((a, a + PAGE),), int(Event.RELEASE)),
             E.EINVAL, True),
        Case("sync_range no such pid", lambda i: encode(M.SyncRange(
            pid=PID_MAX_EVER + 5, ranges=((0, PAGE),), event=1), i), E.ESRCH, False),
        # out of order for the session's state
        Case("ack for an INVALIDATE never sent", lambda i: encode(M.Ack(n=1 << 40), i),
             E.EINVAL, True),
        Case("ack of u64 max", lambda i: encode(M.Ack(n=U64_MAX), i), E.EINVAL, True),
        Case("dma before register", dma_read(a, 1, mirror=s.mirror + 1000), E.NO_MIRROR, False),
        Case("fault on another session's mirror", fault(a, 1, mirror=s.others_mirror),
             E.NO_MIRROR, False),
        Case("dma on another session's mirror", dma_read(a, 1, mirror=s.others_mirror),
             E.NO_MIRROR, False),
        Case("unregister unknown mirror", lambda i: encode(M.Unregister(mirror=U64_MAX), i),
             E.NO_MIRROR, False),
    ]  # fmt: skip


# --- the case-by-case test ------------------------------------------------------------------


async def run_cases(
    cases: list[Case],
    peer: RawPeer,
    watcher: RawPeer,
    w: Witness,
    alive: Callable[[], None],
    failures: list[str],
) -> int:
    """Send each case; check the answer, the count, the daemon and the witness.

    Returns how many of the cases ``bad_messages`` had to count.
    """
    counted = 0
    for case in cases:
        msg_id = peer.take_id()
        before = await watcher.status()
        try:
            env = await peer.send(case.build(msg_id), msg_id if case.named else 0)
        except TimeoutError as exc:
            failures.append(f"{case.name}: {exc}")
            # The reply may have gone out anonymously: drop it so it answers no later case.
            while not peer.anonymous.empty():
                peer.anonymous.get_nowait()
            continue
        after = await watcher.status()
        alive()
        if not isinstance(env.msg, M.Error):
            failures.append(f"{case.name}: answered {env.type}, not error")
        elif env.msg.code != case.code:
            got = ErrorCode(env.msg.code).name if env.msg.code in set(ErrorCode) else env.msg.code
            failures.append(f"{case.name}: code {got}, expected {case.code.name}")
        elif not env.msg.message:
            failures.append(f"{case.name}: empty error message")
        grew = after["bad_messages"] - before["bad_messages"]
        if grew != int(case.bad):
            failures.append(f"{case.name}: bad_messages grew by {grew}, expected {int(case.bad)}")
        if after["messages"] - before["messages"] < 2:
            failures.append(f"{case.name}: messages did not count the input")
        counted += case.bad
        await w.check()
    return counted


async def test_each_hostile_input_gets_a_typed_error_and_is_counted(
    hmmd: Any, puppet: Any, agent: Callable[..., Any]
) -> None:
    def alive() -> None:
        assert hmmd.proc.poll() is None, f"hmmd died\n{hmmd.stderr()[-4000:]}"

    failures: list[str] = []
    async with witness(agent, puppet) as w, raw_peers(hmmd.endpoint) as make:
        watcher, early, peer = make(), make(), make()
        start = await watcher.status()
        assert start["metrics"], "hmmd was started with --metrics and must report its URL"

        state = State(pid=puppet.pid, addr=w.addr, mirror=0, others_mirror=w.mirror.id)
        counted = await run_cases(decode_cases(), peer, watcher, w, alive, failures)
        counted += await run_cases(before_hello_cases(state), early, watcher, w, alive, failures)

        # A session with a real mirror of the witness's pages, for the range cases.
        assert isinstance((await peer.request(M.Hello(agent="fuzz-peer"))).msg, M.Welcome)
        reg = M.Register(
            pid=puppet.pid, start_time=0, intervals=((w.addr, w.addr + NPAGES * PAGE),), access=3
        )
        env = await peer.request(reg)
        assert isinstance(env.msg, M.Registered), env
        state.mirror = env.msg.mirror
        counted += await run_cases(session_cases(state), peer, watcher, w, alive, failures)

        # Absurd but legal: invalidate [0, 2^64-1) of the target. Every mirror of it (the
        # witness's too) gets the range clipped to its own bounds, and acks.
        await w.check(0, U64_MAX)

        # A newer minor version is tolerated; a second hello replaces the session, and the
        # old session's mirror is gone with it.
        msg_id = peer.take_id()
        hello = frames_of(head("hello", msg_id, [PROTOCOL_VERSION[0], 99]), {"agent": "again"})
        env = await peer.send(hello, msg_id)
        assert isinstance(env.msg, M.Welcome), env
        old = M.Fault(mirror=state.mirror, start=w.addr, npages=1, write=False, mode=1)
        gone = [Case("fault on the mirror of the replaced session", lambda i: encode(old, i),
                     ErrorCode.NO_MIRROR, False)]  # fmt: skip
        counted += await run_cases(gone, peer, watcher, w, alive, failures)
        assert isinstance((await peer.request(M.Goodbye())).msg, M.Ok)
        after_bye = [Case("ack after goodbye", lambda i: encode(M.Ack(n=1), i),
                          ErrorCode.NO_SESSION, True)]  # fmt: skip
        counted += await run_cases(after_bye, peer, watcher, w, alive, failures)

        end = await watcher.status()
        metrics = await scrape_metrics(str(end["metrics"]))
        assert not peer.undecodable and not early.undecodable, "hmmd sent undecodable replies"

    assert not failures, f"{len(failures)} cases went wrong:\n  " + "\n  ".join(failures)
    assert end["bad_messages"] - start["bad_messages"] == counted
    # Nothing bad was sent between the last status and the scrape.
    assert metrics["hmmirror_bad_messages_total"] == end["bad_messages"], metrics
    assert metrics["hmmirror_messages_total"] >= end["messages"]
    assert w.rounds >= 60, "the witness checked an invalidation after every case"
    log = hmmd.stderr()
    assert "unhandled error" not in log and "Traceback" not in log, log[-4000:]


# --- the random phase -----------------------------------------------------------------------


class RandomFrames:
    """Seeded hostile frame sets: mutated valid messages, garbage, odd frame counts."""

    def __init__(self, rng: random.Random, pid: int, addr: int) -> None:
        self.rng = rng
        top = (1 << 64) - PAGE
        # Requests this peer may send: none of them registers the witness's pages, so no
        # mirror of this peer ever holds back the witness's invalidations.
        self.templates: list[M.Message] = [
            M.Hello(agent="random", pid=1),
            M.Heartbeat(),
            M.Status(),
            M.Inventory(),
            M.Ack(n=rng.choice([1, 7, U64_MAX])),
            M.Register(pid=PID_MAX_EVER + 3, start_time=0, intervals=((0, PAGE),), access=1),
            M.Register(pid=pid, start_time=1, intervals=((addr, addr + PAGE),), access=3),
            M.Fault(mirror=1, start=top, npages=2, write=True, mode=1),
            M.DmaRead(mirror=2, start=addr, npages=1),
            M.DmaWrite(mirror=3, start=0, npages=1, offset=0, length=0),
            M.SyncRange(pid=PID_MAX_EVER + 3, ranges=((0, U64_MAX),), event=1),
            M.Unregister(mirror=U64_MAX),
            M.Goodbye(),
        ]

    def valid(self) -> list[bytes]:
        """One template, encoded with bulk frames of the right sizes."""
        msg = self.rng.choice(self.templates)
        bulk = [self.rng.randbytes(n) for n in msg.bulk_sizes()]
        return [bytes(f) for f in encode(msg, self.rng.randrange(1, 1 << 32), bulk=bulk)]

    def __call__(self) -> list[bytes]:
        r = self.rng
        kind = r.random()
        if kind < 0.15:  # garbage frames, any number
            return [r.randbytes(r.choice([0, 1, 3, 40, 200])) for _ in range(r.randint(1, 7))]
        frames = [bytearray(f) for f in self.valid()]
        if kind < 0.25:
            return [bytes(f) for f in frames]
        for _ in range(r.randint(1, 4)):
            i = r.randrange(len(frames))
            f = frames[i]
            op = r.randrange(6)
            if op == 0 and f:
                f[r.randrange(len(f))] ^= 1 << r.randrange(8)
            elif op == 1 and f:
                f[r.randrange(len(f))] = r.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCF, 0xFF])
            elif op == 2:
                del f[r.randrange(len(f) + 1) :]
            elif op == 3:
                f += r.randbytes(r.randint(1, 9))
            elif op == 4 and len(frames) > 1:
                del frames[i]
            else:
                frames.insert(r.randrange(len(frames) + 1), bytearray(r.randbytes(r.randint(0, 9))))
        return [bytes(f) for f in frames]


async def test_random_frames_while_an_agent_mirrors(
    hmmd: Any, puppet: Any, agent: Callable[..., Any]
) -> None:
    async with witness(agent, puppet) as w, raw_peers(hmmd.endpoint) as make:
        watcher, peer = make(), make()
        before = await watcher.status()
        gen = RandomFrames(random.Random(SEED), puppet.pid, w.addr)
        stop = asyncio.Event()

        async def keep_checking() -> None:
            while not stop.is_set():
                await w.check()

        checker = asyncio.ensure_future(keep_checking())
        sent = undecodable = 0
        deadline = time.monotonic() + RANDOM_SECONDS
        try:
            for i in range(RANDOM_FRAMES):
                if time.monotonic() > deadline:
                    break
                frames = gen()
                try:
                    decode(frames)
                except ProtocolError:
                    undecodable += 1
                await asyncio.wait_for(peer.sock.send_multipart(frames), REPLY_TIMEOUT)
                sent += 1
                if i % 10 == 0:
                    await asyncio.sleep(0.002)  # let the witness and the replies through
                    assert hmmd.proc.poll() is None, f"hmmd died\n{hmmd.stderr()[-4000:]}"
                    assert not checker.done() or checker.exception() is None, "witness failed"
        finally:
            stop.set()
            await asyncio.wait_for(checker, 2 * REPLY_TIMEOUT)
        # The same connection: this status is answered after every frame set sent before it.
        after = await peer.status()
        await w.check()
        assert hmmd.proc.poll() is None
        assert sent >= 300, f"only {sent} frame sets in {RANDOM_SECONDS} s"
        assert undecodable >= sent // 4, "the generator should produce plenty of bad frames"
        grew = after["bad_messages"] - before["bad_messages"]
        assert grew >= undecodable, f"bad_messages +{grew} < {undecodable} undecodable sent"
        assert not peer.undecodable, f"hmmd sent undecodable replies: {peer.undecodable[:3]}"
        print(
            f"random phase: {sent} frame sets ({undecodable} undecodable), bad_messages +{grew}, "
            f"witness rounds {w.rounds}, every invalidation received"
        )

        # A fresh session is served normally afterwards.
        fresh = make()
        env = await fresh.request(M.Hello(agent="after-random", pid=os.getpid()))
        assert isinstance(env.msg, M.Welcome), env
        env = await fresh.request(M.Register(
            pid=puppet.pid, start_time=0, intervals=((w.addr, w.addr + PAGE),), access=1,
        ))  # fmt: skip
        assert isinstance(env.msg, M.Registered), env
        env = await fresh.request(
            M.Fault(mirror=env.msg.mirror, start=w.addr, npages=1, write=False, mode=1)
        )
        assert isinstance(env.msg, M.FaultReply), env
        assert int.from_bytes(env.bulk[0], "little") & HMM_PFN_VALID
        await w.check()
    log = hmmd.stderr()
    assert "unhandled error" not in log and "Traceback" not in log, log[-4000:]


# --- hm-agent's RDMA service takes untrusted frames too ---------------------------------------


async def test_hm_agent_names_the_malformed_request_it_refuses(hmmd: Any, puppet: Any) -> None:
    """A requester's truncated RDMA WRITE gets BAD_MESSAGE naming its id, not ``re = 0``."""
    from .test_hm_agent import hm_agent

    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"r" * PAGE)
    spec = f"{puppet.pid}:{addr:#x}:{PAGE}:rwa"
    async with hm_agent(hmmd, spec, insecure=True) as device, raw_peers(device.endpoint) as make:
        peer = make()
        write = M.RdmaWrite(rkey=device.rkeys[0], addr=addr, length=16)
        msg_id = peer.take_id()
        env = await peer.send(encode(write, msg_id, bulk=[bytes(15)]), msg_id)
        assert isinstance(env.msg, M.Error) and env.msg.code == ErrorCode.BAD_MESSAGE, env
        env = await peer.request(write, bulk=[b"w" * 16])
        assert isinstance(env.msg, M.Ok), env
    assert hmmd.proc.poll() is None
