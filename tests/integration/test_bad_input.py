"""A live hmmd survives 10,000 hostile frames and then serves a valid session correctly.

The daemon is a real process (``python -m hmmirror.daemon run``), driven over a
real ZeroMQ DEALER on a short ``ipc://`` path. The frames are seeded-random:
pure garbage, valid messages with bytes flipped or frames truncated, wrong
versions, unknown types, short bulk frames, absurd ranges, and requests that
make no sense in the session's state. Afterwards the daemon must be alive, its
``bad_messages`` counter must have grown by at least the number of frame sets
that cannot decode at all, and a fresh session (and a real mirror of a page of
this test process) must work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import mmap
import os
import random
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hmmirror.proto import PROTOCOL_VERSION, ErrorCode, ProtocolError, decode, encode
from hmmirror.proto import messages as M
from hmmirror.proto.codec import Envelope
from hmmirror.proto.entries import HMM_PFN_ERROR, HMM_PFN_VALID, PAGE_SIZE, from_wire, to_wire
from hmmirror.proto.schema import U64_MAX, Kind
from hmmirror.testing.hmmd import HmmdProcess, HmmdStartError, launch_hmmd
from hmmirror.transport import dial

pytestmark = pytest.mark.timeout(60)

SEED = 0x484D4D  # "HMM"
N_FRAMES = 10_000
READY_TIMEOUT = 10.0
REPLY_TIMEOUT = 5.0
FUZZ_DEADLINE = 30.0
#: Keeps a daemon that believes a peer's sizes from taking the test machine down with it:
#: it gets MemoryError instead of the OOM killer.
DAEMON_ADDRESS_SPACE = 8 << 30
PID_MAX_EVER = 1 << 22  # kernel PID_MAX_LIMIT: no process can have a larger pid


# --- the daemon under test ------------------------------------------------------------------


def output(daemon: HmmdProcess, tail: int = 60) -> str:
    """hmmd's stdout, then the last ``tail`` lines of its log that are not INFO chatter."""
    err = daemon.log().splitlines()
    loud = [line for line in err if line.split(" ", 2)[1:2] != ["info"]]  # TIMESTAMP level ...
    return "\n".join(
        [
            "--- hmmd stdout ---",
            *daemon.stdout_lines,
            f"--- hmmd stderr: {len(err)} lines, last {tail} non-INFO ---",
            *loud[-tail:],
        ]
    )


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (DAEMON_ADDRESS_SPACE, DAEMON_ADDRESS_SPACE))


@pytest.fixture
def bad_input_hmmd() -> Iterator[HmmdProcess]:
    """Start hmmd on a short ipc path, wait for its READY line (10 s), SIGTERM then SIGKILL."""
    tmp = Path(tempfile.mkdtemp(prefix="hmmbi-", dir="/tmp"))
    endpoint = f"ipc://{tmp}/hmmd.sock"
    assert len(endpoint) - len("ipc://") < 100, "sun_path limit"
    daemon = launch_hmmd(
        endpoint,
        log_path=str(tmp / "hmmd.stderr"),
        spawn=functools.partial(subprocess.Popen, preexec_fn=_limit_address_space),
    )
    try:
        try:
            daemon.wait_ready(READY_TIMEOUT)
        except HmmdStartError as e:
            pytest.fail(f"{e}\n{output(daemon)}")
        yield daemon
    finally:
        rc, killed = daemon.stop(10)
        print(output(daemon))  # shown by pytest when the test failed
        shutil.rmtree(tmp, ignore_errors=True)
    assert rc == 0 and not killed, f"hmmd did not exit cleanly on SIGTERM (returncode {rc})"


# --- a small synchronous peer ---------------------------------------------------------------


class Peer:
    """A DEALER with deadlines everywhere; it acks every INVALIDATE it sees."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        # RCVHWM 0: never make the daemon's sends fail on our account.
        self.sock = dial(ctx, endpoint, options={zmq.RCVHWM: 0, zmq.SNDHWM: 10_000})
        self.next_id = 1_000_000
        self.replies: list[Envelope] = []
        self.undecodable_replies: list[tuple[list[bytes], str]] = []

    def close(self) -> None:
        self.sock.close(linger=0)

    def send_raw(self, frames: Sequence[bytes], deadline: float) -> None:
        """Queue one multipart message without ever blocking past ``deadline``."""
        while True:
            try:
                self.sock.send_multipart(list(frames), zmq.NOBLOCK)
                return
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        "hmmd stopped taking messages: send queue full past the deadline"
                    ) from None
                self.sock.poll(20, zmq.POLLOUT | zmq.POLLIN)
                self.drain()

    def drain(self, limit: int = 10_000) -> int:
        """Receive whatever replies are queued (bounded); return how many."""
        n = 0
        while n < limit:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            self._take(frames)
        return n

    def _take(self, frames: list[bytes]) -> Envelope | None:
        try:
            env = decode(frames)
        except ProtocolError as exc:
            self.undecodable_replies.append((frames, str(exc)))
            return None
        self.replies.append(env)
        if isinstance(env.msg, M.Invalidate):
            ack = encode(M.Ack(n=env.msg.n), id=self._id())
            with contextlib.suppress(zmq.Again):
                self.sock.send_multipart(ack, zmq.NOBLOCK)
        return env

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def request(
        self, msg: M.Message, bulk: Sequence[Any] = (), timeout: float = REPLY_TIMEOUT
    ) -> Envelope:
        """Send ``msg`` and return the reply whose ``re`` names it."""
        msg_id = self._id()
        deadline = time.monotonic() + timeout
        self.send_raw(encode(msg, id=msg_id, bulk=bulk), deadline)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {msg.TYPE} id {msg_id} from hmmd in {timeout} s")
            if not self.sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                continue
            env = self._take(self.sock.recv_multipart())
            if env is not None and env.re == msg_id:
                return env

    def status(self) -> dict[str, Any]:
        env = self.request(M.Status())
        assert isinstance(env.msg, M.StatusReply), env
        return env.msg.stats


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        done = threading.Event()

        def term() -> None:
            ctx.term()
            done.set()

        threading.Thread(target=term, daemon=True).start()
        assert done.wait(10), "zmq Context.term() hung: a socket was left open"


# --- hostile frames -------------------------------------------------------------------------


class Fuzzer:
    """Seeded generator of hostile multipart messages."""

    #: Types a peer may send the daemon, and the ones only the daemon sends.
    REQUESTS = (
        M.Hello,
        M.Heartbeat,
        M.Goodbye,
        M.Register,
        M.Unregister,
        M.Fault,
        M.Ack,
        M.SyncRange,
        M.DmaRead,
        M.DmaWrite,
        M.Status,
    )

    def __init__(self, rng: random.Random, daemon_pid: int) -> None:
        self.rng = rng
        self.pids = [
            0,
            1 << 32,
            PID_MAX_EVER + 1,
            PID_MAX_EVER + rng.randrange(1 << 20),
            os.getpid(),
            daemon_pid,
        ]
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    # values

    def addr(self) -> int:
        r = self.rng
        return r.choice(
            [
                0,
                PAGE_SIZE,
                1 << 47,
                (1 << 47) - PAGE_SIZE,
                (1 << 47) + PAGE_SIZE,
                U64_MAX,
                U64_MAX - PAGE_SIZE + 1,
                U64_MAX - 1,
                (1 << 64) - (1 << 12),
                r.randrange(1 << 47) & ~(PAGE_SIZE - 1),
                r.randrange(1 << 64),
                r.randrange(1 << 47) | 1,
                0x7FFF_FFFF_F000,
                0xFFFF_8000_0000_0000,
            ]
        )

    def npages(self, cap: int) -> int:
        r = self.rng
        if r.random() < 0.05:
            return r.choice([cap, cap - 1, cap + 1 if cap < 1 << 18 else cap])
        return r.choice([0, 1, 2, 3, r.randrange(min(cap, 64) + 1)])

    def uint(self, bound: int) -> int:
        return self.rng.choice([0, 1, 2, 3, bound, bound - 1, self.rng.randrange(bound + 1)])

    def text(self, cap: int) -> str:
        n = self.rng.choice([0, 1, cap // 2, cap])
        return "".join(chr(self.rng.choice([0x41, 0x7A, 0xE9, 0x4E2D, 0x1F600])) for _ in range(n))

    def interval(self) -> tuple[int, int]:
        r = self.rng
        kind = r.randrange(4)
        if kind == 0:  # absurd but decodable: spans up to the end of u64 space
            a = self.addr()
            return (
                (a, min(U64_MAX, a + r.choice([PAGE_SIZE, 1, 1 << 47, U64_MAX])))
                if a < U64_MAX
                else (U64_MAX - 1, U64_MAX)
            )
        if kind == 1:  # whole user address space
            return (0, 1 << 47)
        a = r.randrange(1 << 35) << 12
        return (a, a + r.choice([1, PAGE_SIZE, 3 * PAGE_SIZE + 7, 1 << 30]))

    def message(self) -> M.Message:
        """A message that decodes, with hostile values where the schema allows them."""
        r = self.rng
        cls = r.choice(M.ALL_MESSAGES if r.random() < 0.15 else self.REQUESTS)
        pid = r.choice(self.pids)
        if cls is M.Hello:
            return M.Hello(agent=self.text(M.NAME_MAX), pid=self.uint(1 << 32))
        if cls is M.Register:
            intervals = tuple(self.interval() for _ in range(r.choice([1, 1, 2, M.MAX_INTERVALS])))
            intervals = tuple(i for i in intervals if i[0] < i[1]) or ((0, PAGE_SIZE),)
            return M.Register(
                pid=pid, start_time=self.uint(U64_MAX), intervals=intervals, access=self.uint(3)
            )
        if cls is M.Fault:
            return M.Fault(
                mirror=self.uint(8),
                start=self.addr(),
                npages=self.npages(M.MAX_FAULT_PAGES),
                write=r.random() < 0.5,
                mode=self.uint(1),
            )
        if cls is M.SyncRange:
            return M.SyncRange(pid=pid, ranges=((self.addr(), self.addr()),), event=self.uint(255))
        if cls in (M.DmaRead, M.DmaWrite):
            return cls(mirror=self.uint(8), start=self.addr(), npages=self.npages(M.MAX_DMA_PAGES))
        if cls is M.Ack:
            return M.Ack(n=self.uint(U64_MAX))
        if cls is M.Unregister:
            return M.Unregister(mirror=self.uint(U64_MAX))
        return self.generic(cls)

    def generic(self, cls: type[M.Message]) -> M.Message:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            spec = f.metadata["wire"]
            if spec.kind is Kind.UINT:
                values[f.name] = self.uint(min(spec.max, U64_MAX))
                if f.name == "npages":
                    values[f.name] = self.npages(spec.max) if spec.max <= 1 << 18 else 1
            elif spec.kind is Kind.BOOL:
                values[f.name] = self.rng.random() < 0.5
            elif spec.kind is Kind.STR:
                values[f.name] = self.text(min(spec.max, 64))
            elif spec.kind is Kind.UINTS:
                values[f.name] = tuple(self.uint(U64_MAX) for _ in range(3))
            elif spec.kind is Kind.INTERVALS:
                values[f.name] = ((0, PAGE_SIZE),)
            elif spec.kind is Kind.ITEMS:
                values[f.name] = ((1, 1, 0, PAGE_SIZE, 0),)
            elif spec.kind is Kind.STATS:
                values[f.name] = {"bad_messages": 0}
        return cls(**values)

    def entries(self, npages: int) -> bytes:
        r = self.rng
        pick = [HMM_PFN_VALID | r.randrange(1 << 40), 0, U64_MAX, HMM_PFN_ERROR]
        return b"".join(
            r.choice(pick).to_bytes(8, "little") for _ in range(min(npages, 64))
        ) + bytes(8 * max(0, npages - 64))

    def valid(self, msg: M.Message | None = None) -> list[bytes]:
        msg = msg if msg is not None else self.message()
        bulk: list[bytes] = []
        for name, size in zip(type(msg).BULK, msg.bulk_sizes(), strict=True):
            bulk.append(self.entries(size // 8) if name == "entries" else self.rng.randbytes(size))
        return [bytes(f) for f in encode(msg, id=self._id(), re=self.uint(3), bulk=bulk)]

    # hostile frame sets

    def garbage(self) -> list[bytes]:
        r = self.rng
        frames = [r.randbytes(r.choice([0, 1, 2, 5, 17, 64, 300])) for _ in range(r.randint(1, 6))]
        if r.random() < 0.5:
            frames[0] = b""
        return frames

    def mutated(self) -> list[bytes]:
        r = self.rng
        frames = [bytearray(f) for f in self.valid()]
        for _ in range(r.randint(1, 3)):
            i = r.randrange(len(frames))
            f = frames[i]
            op = r.randrange(5)
            if op == 0 and f:
                f[r.randrange(len(f))] ^= 1 << r.randrange(8)
            elif op == 1 and f:
                f[r.randrange(len(f))] = r.randrange(256)
            elif op == 2:
                del f[r.randrange(len(f) + 1) :]
            elif op == 3:
                f += r.randbytes(r.randint(1, 9))
            elif len(frames) > 1:
                del frames[i]
        return [bytes(f) for f in frames]

    def header(self, header: dict[str, Any], body: Any, *bulk: bytes) -> list[bytes]:
        return [b"", msgpack.packb(header), msgpack.packb(body), *bulk]

    def wrong_version(self) -> list[bytes]:
        r = self.rng
        v = r.choice(
            [
                [0, 0],
                [2, 0],
                [PROTOCOL_VERSION[0] + 1, 0],
                [65535, 65535],
                [1],
                [1, 0, 0],
                "1.0",
                None,
                [-1, 0],
                [True, False],
            ]
        )
        frames = self.valid()
        header = msgpack.unpackb(frames[1])
        header["v"] = v
        frames[1] = msgpack.packb(header)
        return frames

    def unknown_type(self) -> list[bytes]:
        r = self.rng
        mtype = r.choice(
            [
                "",
                "nope",
                "HELLO",
                "__init__",
                "__class__",
                "TYPES",
                "x" * 33,
                7,
                None,
                "register\x00",
                "fault ",
                "dma_read_reply2",
                "HANDLERS",
            ]
        )
        return self.header({"v": [1, 0], "type": mtype, "id": self._id()}, {"agent": "x"})

    def short_bulk(self) -> list[bytes]:
        r = self.rng
        cls = r.choice([M.DmaRead, M.DmaWrite, M.FaultReply, M.DmaReadReply])
        frames = self.valid(
            self.generic(cls)
            if cls is not M.DmaWrite
            else M.DmaWrite(mirror=1, start=0, npages=r.randint(1, 16))
        )
        i = r.randrange(3, len(frames))
        op = r.randrange(4)
        if op == 0:
            frames[i] = frames[i][: r.randrange(max(1, len(frames[i])))] if frames[i] else b"\x00"
        elif op == 1:
            frames[i] += b"\x00"
        elif op == 2:
            del frames[i]
        else:
            frames.append(b"\x00" * 8)
        return frames

    def bad_body(self) -> list[bytes]:
        """Well-formed header, a body that violates the schema."""
        r = self.rng
        cases: list[tuple[str, dict[str, Any]]] = [
            ("hello", {"agent": True}),
            ("hello", {"pid": 1}),
            ("hello", {"agent": "a", "pid": -1}),
            ("hello", {"agent": "a", "pid": (1 << 32) + 1}),
            ("register", {"pid": 1, "start_time": 0, "intervals": [[8192, 4096]], "access": 1}),
            ("register", {"pid": 1, "start_time": 0, "intervals": [[4096, 4096]], "access": 1}),
            ("register", {"pid": 1, "start_time": 0, "intervals": [[0, 4096]] * 65, "access": 1}),
            ("register", {"pid": 1, "start_time": 0, "intervals": [[0, 4096]], "access": 4}),
            ("register", {"pid": 1, "start_time": True, "intervals": [[0, 4096]], "access": 1}),
            (
                "fault",
                {"mirror": 1, "start": 0, "npages": (1 << 18) + 1, "write": False, "mode": 1},
            ),
            ("fault", {"mirror": 1, "start": -4096, "npages": 1, "write": False, "mode": 1}),
            ("fault", {"mirror": 1, "start": 0, "npages": 1, "write": 1, "mode": 1}),
            ("fault", {"mirror": 1, "start": 0, "npages": 1, "write": False, "mode": 2}),
            ("dma_read", {"mirror": 1, "start": 0, "npages": 1025}),
            ("sync_range", {"pid": 1, "start": 0, "end": 1.5, "event": 0}),
            ("sync_range", {"pid": 1, "start": 0, "end": 4096, "event": 256}),
            ("ack", {"n": -1}),
            ("ack", {"n": "1"}),
            ("unregister", {}),
            ("invalidate", {"n": 1, "items": [[1, 2, 3]]}),
            ("evicted", {"mirrors": [1] * 65537, "reason": "r"}),
            ("status_reply", {"stats": {"k": [1]}}),
        ]
        mtype, body = r.choice(cases)
        return self.header({"v": [1, 0], "type": mtype, "id": self._id()}, body)

    def out_of_order(self) -> list[bytes]:
        """Decodable requests that the session's state does not allow (before hello, bogus acks)."""
        r = self.rng
        msg = r.choice(
            [
                M.Fault(mirror=r.randrange(4), start=0, npages=1, write=False, mode=1),
                M.Ack(n=r.choice([1, 2, 1 << 40, U64_MAX])),
                M.DmaRead(mirror=1, start=0, npages=1),
                M.DmaWrite(mirror=1, start=0, npages=1),
                M.Unregister(mirror=r.randrange(1 << 20)),
                M.Heartbeat(),
                M.Goodbye(),
                M.Register(
                    pid=PID_MAX_EVER + 7, start_time=0, intervals=((0, PAGE_SIZE),), access=1
                ),
                M.Register(pid=os.getpid(), start_time=1, intervals=((0, PAGE_SIZE),), access=3),
                M.SyncRange(pid=PID_MAX_EVER + 7, ranges=((0, PAGE_SIZE),), event=0),
                M.SyncRange(pid=os.getpid(), ranges=((PAGE_SIZE, 0),), event=5),
            ]
        )
        return self.valid(msg)

    def frames(self, phase: str) -> list[bytes]:
        if phase == "before_hello":
            return self.out_of_order()
        r = self.rng.random()
        if r < 0.20:
            return self.garbage()
        if r < 0.45:
            return self.mutated()
        if r < 0.52:
            return self.wrong_version()
        if r < 0.58:
            return self.unknown_type()
        if r < 0.66:
            return self.short_bulk()
        if r < 0.76:
            return self.bad_body()
        if r < 0.86:
            return self.out_of_order()
        return self.valid()


def undecodable(frames: list[bytes]) -> bool:
    """Whether no correct daemon could accept these frames (our codec refuses them)."""
    try:
        decode(frames)
    except ProtocolError:
        return True
    return False


# --- the test -------------------------------------------------------------------------------


def _own_page() -> tuple[mmap.mmap, int, bytes]:
    """An anonymous page of this process, filled with a pattern; returns (map, address, bytes)."""
    page = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pattern = bytes(random.Random(SEED).randbytes(PAGE_SIZE))
    page[:] = pattern
    anchor = ctypes.c_char.from_buffer(page)
    addr = ctypes.addressof(anchor)
    del anchor  # release the buffer export so the map can be closed later
    assert addr % PAGE_SIZE == 0
    return page, addr, pattern


async def _client_read(endpoint: str, addr: int, pattern: bytes) -> None:
    """The same page through the agent library: REGISTER, the fault loop, a DMA read."""
    from hmmirror.client import Access, connect

    async with connect(endpoint, name="bad-input-client") as session:
        mirror = await session.mirror(os.getpid(), addr, PAGE_SIZE, Access.READ)
        first = await mirror.read(addr, 1)
        assert first.data == pattern
        assert (first.cpages, first.faults) == (1, 1), first
        again = await mirror.read(addr, 1)
        assert again.data == pattern
        assert again.faults == 0, "a second read of a mirrored page needs no fault"
        await mirror.close()


def test_hostile_frames_do_not_hurt_hmmd(
    bad_input_hmmd: HmmdProcess, zmq_ctx: zmq.Context[Any]
) -> None:
    daemon = bad_input_hmmd
    rng = random.Random(SEED)
    fuzz = Fuzzer(rng, daemon.proc.pid)
    start = time.monotonic()

    fuzzer = Peer(zmq_ctx, daemon.endpoint)
    try:
        before = fuzzer.status()
        assert "bad_messages" in before, before

        # Typed error replies the protocol promises, before any session exists.
        env = fuzzer.request(M.Fault(mirror=1, start=0, npages=1, write=False, mode=1))
        assert isinstance(env.msg, M.Error) and env.msg.code == ErrorCode.NO_SESSION, env
        assert env.msg.message, "error messages are never empty"
        env = fuzzer.request(M.DmaRead(mirror=1, start=0, npages=1), bulk=[bytes(8)])
        assert isinstance(env.msg, M.Error) and env.msg.code == ErrorCode.NO_SESSION, env

        sent = Counter[str]()
        must_reject = 0
        deadline = time.monotonic() + FUZZ_DEADLINE
        for i in range(N_FRAMES):
            phase = "before_hello" if i < 300 else "mixed"
            frames = fuzz.frames(phase)
            if any(len(f) > M.MAX_FRAME for f in frames):
                continue  # MAXMSGSIZE drops the connection; tested on its own below
            fuzzer.send_raw(frames, deadline)
            sent[phase] += 1
            must_reject += undecodable(frames)
            if i % 16 == 0:
                fuzzer.drain()
            if time.monotonic() > deadline:
                pytest.fail(f"sending {N_FRAMES} frames took over {FUZZ_DEADLINE} s (at {i})")
        assert sum(sent.values()) >= N_FRAMES * 0.99
        assert must_reject >= N_FRAMES // 4, "the fuzzer should produce plenty of garbage"

        assert daemon.proc.poll() is None, f"hmmd died under fuzzing\n{output(daemon)}"
        # Same connection: the daemon handles one peer's messages in order, so this
        # reply counts every frame sent before it.
        after = fuzzer.request(M.Status(), timeout=20).msg
        assert isinstance(after, M.StatusReply)
        grew = after.stats["bad_messages"] - before["bad_messages"]  # type: ignore[operator]
        assert grew >= must_reject, (
            f"bad_messages grew by {grew}, but {must_reject} of the frame sets sent cannot decode"
        )
        fuzzer.drain()
        assert not fuzzer.undecodable_replies, (
            f"hmmd sent {len(fuzzer.undecodable_replies)} replies our codec refuses, "
            f"first: {fuzzer.undecodable_replies[0]}"
        )
        errors = Counter(
            ErrorCode(e.msg.code).name if e.msg.code in ErrorCode._value2member_map_ else e.msg.code
            for e in fuzzer.replies
            if isinstance(e.msg, M.Error)
        )
        print(
            f"sent {dict(sent)}, must reject {must_reject}, bad_messages +{grew}, "
            f"replies {Counter(e.type for e in fuzzer.replies)}, errors {dict(errors)}"
        )
        assert all(isinstance(code, str) for code in errors), f"unknown error codes: {errors}"
        assert "INTERNAL" not in errors, f"hostile input reached a handler bug: {errors}"
    finally:
        fuzzer.close()

    # A frame over MAXMSGSIZE: the connection is dropped, the daemon lives on.
    big = Peer(zmq_ctx, daemon.endpoint)
    try:
        big.send_raw([b"", b"\x80", b"\x00" * (M.MAX_FRAME + 1)], time.monotonic() + 5)
        time.sleep(0.2)
    finally:
        big.close()
    assert daemon.proc.poll() is None, f"hmmd died on an oversize frame\n{output(daemon)}"

    # A valid session is served correctly afterwards.
    peer = Peer(zmq_ctx, daemon.endpoint)
    page, addr, pattern = _own_page()
    try:
        env = peer.request(M.Hello(agent="bad-input-test", pid=os.getpid()))
        assert isinstance(env.msg, M.Welcome), env
        welcome = env.msg
        assert welcome.epoch and welcome.session
        assert welcome.epoch == str(peer.status()["epoch"])
        stats = peer.status()
        assert daemon.proc.poll() is None

        # A real mirror of one page of this very process: REGISTER, FAULT, DMA read.
        env = peer.request(
            M.Register(
                pid=os.getpid(),
                start_time=0,
                intervals=((addr, addr + PAGE_SIZE),),
                access=M.Access.READ,
            )
        )
        assert isinstance(env.msg, M.Registered), env
        mirror = env.msg.mirror
        assert env.msg.pid == os.getpid()
        env = peer.request(
            M.Fault(mirror=mirror, start=addr, npages=1, write=False, mode=M.FaultMode.POPULATE)
        )
        assert isinstance(env.msg, M.FaultReply), env
        assert (env.msg.mirror, env.msg.start, env.msg.npages) == (mirror, addr, 1)
        assert env.msg.seq % 2 == 0, "entries are read while no invalidation is active"
        table = from_wire(env.bulk[0], 1)
        assert int(table[0]) & HMM_PFN_VALID and not int(table[0]) & HMM_PFN_ERROR, hex(table[0])

        env = peer.request(M.DmaRead(mirror=mirror, start=addr, npages=1), bulk=[to_wire(table)])
        assert isinstance(env.msg, M.DmaReadReply), env
        assert bytes(env.bulk[0]) == pattern, "the mirror read other bytes than the page holds"

        # Outside the mirror is refused, the daemon stays up.
        env = peer.request(
            M.Fault(
                mirror=mirror,
                start=addr + PAGE_SIZE,
                npages=1,
                write=False,
                mode=M.FaultMode.POPULATE,
            )
        )
        assert isinstance(env.msg, M.Error), env
        assert env.msg.code in (ErrorCode.EINVAL, ErrorCode.EFAULT), env

        env = peer.request(M.Unregister(mirror=mirror))
        assert isinstance(env.msg, M.Ok), env
        assert peer.status()["faults"] >= stats.get("faults", 0)  # type: ignore[operator]
        env = peer.request(M.Goodbye())
        assert isinstance(env.msg, M.Ok), env

        asyncio.run(asyncio.wait_for(_client_read(daemon.endpoint, addr, pattern), 15))

        # A REGISTER the schema and SPEC.md allow (aligned, end <= 2^47) but that no daemon
        # should allocate for: all of user space, of a process that does not exist. It must
        # get a typed answer; a handler that tries np.zeros(2^35) raises MemoryError instead.
        env = peer.request(M.Hello(agent="bad-input-test-2", pid=os.getpid()))
        assert isinstance(env.msg, M.Welcome), env
        huge = M.Register(
            pid=PID_MAX_EVER + 1,
            start_time=0,
            intervals=((0, M.USER_ADDR_END),),
            access=M.Access.READ,
        )
        try:
            env = peer.request(huge)
        except TimeoutError:
            pytest.fail(
                f"hmmd never answered REGISTER of [0, 2^47) for a missing pid\n{output(daemon)}"
            )
        assert isinstance(env.msg, M.Error), env
        assert env.msg.code in (
            ErrorCode.ESRCH,
            ErrorCode.EINVAL,
            ErrorCode.TOO_LARGE,
            ErrorCode.PERMISSION_DENIED,
        ), env
    finally:
        peer.close()
        with contextlib.suppress(BufferError):
            page.close()
    assert daemon.proc.poll() is None, f"hmmd died\n{output(daemon)}"
    # Every hostile message was handled by a handler, not by the drain loop's last resort.
    log = daemon.log()
    crashes = log.count("unhandled error while handling a message")
    assert crashes == 0, f"{crashes} messages crashed their handler (no reply sent)\n" + "\n".join(
        line for line in log.splitlines() if "Error" in line or "unhandled" in line
    )
    assert time.monotonic() - start < 60
