"""A checker agent: one process, one session, one ODP MR over the target's arena.

``python -m hmmirror.tools.check.agent ENDPOINT INDEX SEED PID START_TIME BASE SIZE LOG``
registers an MR (an mlx5-model ``Nic``) and prints ``{"ready": ...}``. It then
obeys one command per stdin line and answers each with one JSON line:

- ``go`` / ``pause``: start or stop the seeded workload (page faults,
  prefetch, READ, WRITE, atomics); ``pause`` returns once nothing is in flight,
  with the agent's figures, and flushes the DMA log;
- ``table``: a round trip with hmmd (so every message it sent before is
  handled), then the MR's MTT as hex, for the translation oracle;
- ``retarget PID START_TIME BASE SIZE LOG``: register on another process, logging anew;
- ``arm-suicide``: on the next INVALIDATE, zap and then SIGKILL ourselves before the ACK;
- ``flood N``: stop reading, send up to N STATUS requests until hmmd evicts us,
  then read again (hmmd's send queue to us fills: its high-water mark is hit);
- ``exit``.

Every READ is logged with its send and reply times (``stamps.DMA_LOG``), every
WRITE with the stamp it wrote (or WRITE_FAILED when hmmd refused it), every
atomic with the old value it returned. Fault-injection flags make the agent
slow (``--ack-delay``) or deliberately broken: ``--broken-ack`` acks an
INVALIDATE before it zaps (the zap comes ``--broken-zap-delay`` later),
``--corrupt-reads`` logs a wrong value for some READs, ``--lie-atomics`` a
wrong old value for some FETCH_ADDs, ``--lie-writes`` a refused WRITE as
landed, ``--write-shared`` puts WRITE into the zero-page entries hmmd hands it
(a WRITE entry on a page shared copy-on-write). Those exist to prove the
oracles can fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq
from hmmirror.client import (
    AgentError,
    DaemonUnavailable,
    DeviceError,
    Mirror,
    MirrorEvicted,
    RemoteError,
    RequestTimeout,
    Session,
    status,
)
from hmmirror.client.mlx5 import ADVISE_FLUSH, AccessFlags, Advice, MemoryRegion, Nic, Sge
from hmmirror.proto.codec import Envelope, encode
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_VALID, HMM_PFN_WRITE
from hmmirror.proto.messages import FaultReadReply, FaultReply, Invalidate, Message, Status
from hmmirror.tools.check.logged import LoggedDma
from hmmirror.tools.check.stamps import GARBAGE, PAGE, READ, record
from hmmirror.tools.oracle import writable_pages
from hmmirror.transport.sockets import send_frames

ACCESS = (
    AccessFlags.LOCAL_WRITE | AccessFlags.REMOTE_READ | AccessFlags.REMOTE_WRITE
    | AccessFlags.REMOTE_ATOMIC | AccessFlags.ON_DEMAND
)  # fmt: skip
_ZERO_TAIL = bytes(PAGE - 16)
#: STATUS requests a flood sends at a time, and the most it lets hmmd lag behind.
FLOOD_BURST, FLOOD_AHEAD = 2000, 20000


class CheckSession(Session):
    """A session with fault-injection knobs; with none set it is a plain ``Session``."""

    ack_delay = 0.0
    broken_ack = False
    broken_zap_delay = 3.0
    suicide = False
    evictions = 0
    write_shared = False

    async def request(
        self,
        msg: Message,
        bulk: Sequence[Any] = (),
        *,
        timeout: float | None = None,
        expect: type[Message] | None = None,
        copy: bool = True,
    ) -> Envelope:
        """The reply, its fault entries changed first where a knob says so."""
        env = await super().request(msg, bulk, timeout=timeout, expect=expect, copy=copy)
        reply = env.msg
        if self.write_shared and isinstance(reply, FaultReply | FaultReadReply) and env.bulk:
            entries = self._write_zero_page(reply.mirror, reply.start, env.bulk[0])
            env = env._replace(bulk=(entries.data.cast("B"), *env.bulk[1:]))
        return env

    def _write_zero_page(self, mirror_id: int, start: int, wire: memoryview) -> np.ndarray:
        """The bug the checker must catch: WRITE on the zero page (never exclusive) in a
        writable private VMA, as if the write fault had not broken copy-on-write."""
        entries = np.frombuffer(wire, dtype="<u8").copy()
        mirror = self.mirrors.get(mirror_id)
        if mirror is None or not self.zero_pfn:
            return entries
        held = (entries & np.uint64(HMM_PFN_VALID)) != 0
        zero = (entries & np.uint64(HMM_PFN_PFN_MASK)) == np.uint64(self.zero_pfn)
        if (held & zero).any():
            with contextlib.suppress(OSError):  # the target is gone: nothing to plant
                writable, private = writable_pages(mirror.pid, start, len(entries))
                entries[held & zero & writable & private] |= np.uint64(HMM_PFN_WRITE)
        return entries

    def _on_invalidate(self, msg: Invalidate) -> None:
        """Zap and queue the ACK, unless a knob says to misbehave."""
        if self.broken_ack:
            # The bug the checker must catch: ACK at once, zap only later.
            self.invalidations_received += 1
            self._acks.append((msg.n, []))
            mirror = self.mirrors.get(msg.mirror)
            if mirror is not None:
                self.loop.call_later(self.broken_zap_delay, mirror._invalidate_items, msg.items)
            return
        super()._on_invalidate(msg)
        if self.suicide:
            os.kill(os.getpid(), signal.SIGKILL)  # zapped, ACK not sent: killed mid-ack
        if self.ack_delay > 0:
            late: asyncio.Future[None] = self.loop.create_future()
            self._acks[-1][1].append(late)
            self.loop.call_later(self.ack_delay, self._late_ack, late)

    def _late_ack(self, late: asyncio.Future[None]) -> None:
        """The slow agent's delay is over: let the ACK go."""
        late.set_result(None)
        self._advance_acks()

    def _fence(self) -> None:
        """Count evictions (every path that learns of one comes here)."""
        if self._hello_task is None or self._hello_task.done():
            self.evictions += 1
        super()._fence()

    def _lose(self, reason: str) -> None:
        """Count a lost connection as an eviction too: hmmd drops the connection of an
        agent that stopped answering (silent past the idle sweep), which that agent learns
        when it wakes as a send that finds no connection, not as an EVICTED notice."""
        if self.lost is None:
            self.evictions += 1
        super()._lose(reason)


def _mirror(mr: MemoryRegion | None) -> Mirror | None:
    """The one mirror of an explicit MR."""
    if mr is None:
        return None
    seg = mr._segments.get(mr._base)
    return seg.mirror if seg is not None else None


class Agent(LoggedDma):
    """The workload, its figures and its DMA log."""

    def __init__(self, session: CheckSession, args: argparse.Namespace) -> None:
        self.session = session
        self.nic = Nic(session, f"mlx5_{args.index}")
        self.index = args.index
        self.rng = random.Random(args.seed * 1000 + args.index)
        self.corrupt = args.corrupt_reads
        self.lie_atomics = args.lie_atomics
        self.lie_writes = args.lie_writes
        self.atomic_seq = 0
        #: Per page: the value its atomic word last showed us, plus our increment.
        self.guess: dict[int, int] = {}
        self.pid, self.start_time = args.pid, args.start_time
        self.base, self.size = args.base, args.size
        self.log = open(args.log, "ab", buffering=0)  # noqa: SIM115 - closed in retarget/exit
        self.buf = bytearray()
        self.mr: MemoryRegion | None = None
        self.version = 0
        self.stop = asyncio.Event()
        self.workers: list[asyncio.Task[None]] = []
        self.stats: dict[str, Any] = dict.fromkeys(
            ("reads", "quick_reads", "writes", "atomics", "faults", "prefetches", "refused",
             "busy", "reregistered", "corrupted", "lies"), 0,
        )  # fmt: skip
        self.max_op_s = 0.0

    async def register(self, start_time: int | None = None) -> None:
        """A fresh MR over the arena (after an eviction or a daemon restart too)."""
        if self.mr is not None:
            old, self.mr = self.mr, None
            with contextlib.suppress(Exception):
                await self.nic.dereg_mr(old)
        st = self.start_time if start_time is None else start_time
        self.mr = await self.nic.reg_mr(self.pid, self.base, self.size, ACCESS, start_time=st)

    def usable(self) -> bool:
        """Whether the MR still stands (not evicted, dropped, or ended by the target's exit)."""
        mirror = _mirror(self.mr)
        return mirror is not None and mirror.dropped is None

    async def _recover(self) -> None:
        """The MR was lost: register again once the session is live."""
        if self.session.lost is not None:
            await asyncio.sleep(0.05)
            return
        if self.session._hello_task is not None and not self.session._hello_task.done():
            await asyncio.shield(self.session._hello_task)
        try:
            await self.register()
            self.stats["reregistered"] += 1
        except RemoteError as exc:
            self.session.rehello_if_fenced(exc)
            await asyncio.sleep(0.05)
        except (AgentError, OSError):
            await asyncio.sleep(0.05)

    async def worker(self) -> None:
        """Random device operations until paused."""
        while not self.stop.is_set():
            mirror = _mirror(self.mr)
            if mirror is not None and mirror.released:
                await asyncio.sleep(0.01)  # the target exited: nothing left to do
                continue
            if not self.usable():
                await self._recover()
                continue
            await self.op()

    async def _read(self, mr: MemoryRegion, addr: int, length: int) -> memoryview:
        """A device READ; every other one tries the path hm-agent serves a remote READ of
        present pages by (``Nic.read_now``), so the data oracle judges both paths."""
        if self.stats["reads"] % 2:
            got = self.nic.read_now(mr.rkey, addr, length)
            data = None if got is None else await got
            if data is not None:
                self.stats["quick_reads"] += 1
                return data
        pieces = await self.nic.read(mr.rkey, addr, length)
        return pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))

    async def op(self) -> None:
        """One operation, timed; its DMA logged."""
        assert self.mr is not None
        mr, rng = self.mr, self.rng
        npages = self.size // PAGE
        page = rng.randrange(npages)
        addr = self.base + page * PAGE
        choice = rng.random()
        t0 = time.monotonic_ns()
        try:
            if choice < 0.45:
                n = min(rng.randint(1, 4), npages - page)
                data = await self._read(mr, addr, n * PAGE)
                t1 = time.monotonic_ns()
                self.stats["reads"] += 1
                for i in range(n):
                    chunk = data[i * PAGE : (i + 1) * PAGE]
                    word = int.from_bytes(chunk[:8], "little")
                    if self.corrupt and rng.random() < 0.1:
                        word ^= 1 << 36  # the device returned the wrong page's data
                        self.stats["corrupted"] += 1
                    flags = GARBAGE if chunk[16:] != _ZERO_TAIL else 0
                    self.buf += record(t0, t1, addr + i * PAGE, READ, word, flags)
            elif choice < 0.60:
                await self._write(mr, addr, page, t0)
            elif choice < 0.70:
                # On pages 0 and 8 of each slot only: more atomics meet on one counter.
                await self._atomic(mr, addr - (page & 7) * PAGE, t0, choice < 0.67)
            elif choice < 0.85:
                await mr.page_fault(
                    addr, rng.choice((0, PAGE, 4 * PAGE)) if page + 4 < npages else PAGE
                )
                self.stats["faults"] += 1
            else:
                advice = rng.choice((Advice.PREFETCH, Advice.PREFETCH_WRITE))
                length = min(rng.randint(1, 16), npages - page) * PAGE
                await self.nic.advise_mr(advice, ADVISE_FLUSH, [Sge(addr, length, mr.lkey)])
                self.stats["prefetches"] += 1
        except MirrorEvicted:
            # Counted by the session; the worker's next turn finds the MR unusable and
            # _recover registers it again.
            pass
        except DeviceError as exc:
            key = "busy" if exc.errno == errno.EBUSY else "refused"
            self.stats[key] += 1
            if exc.errno in (errno.ESRCH, errno.ENODEV, errno.ENOENT):
                await asyncio.sleep(0.005)
        except (RequestTimeout, DaemonUnavailable, RemoteError):
            await asyncio.sleep(0.02)
        self.max_op_s = max(self.max_op_s, (time.monotonic_ns() - t0) / 1e9)
        if len(self.buf) > 1 << 16:
            self.flush()

    def flush(self) -> None:
        """Write buffered DMA records to the log."""
        if self.buf:
            self.log.write(self.buf)
            self.buf = bytearray()

    async def go(self) -> dict[str, Any]:
        """Start two workers (two DMAs may be in flight at once)."""
        if not self.workers:
            self.stop.clear()
            self.workers = [asyncio.ensure_future(self.worker()) for _ in range(2)]
        return {"ok": True}

    async def pause(self) -> dict[str, Any]:
        """Stop the workers, flush the log; return the figures."""
        self.stop.set()
        if self.workers:
            _, pending = await asyncio.wait(self.workers, timeout=8.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self.workers, return_exceptions=True)
        self.workers = []
        self.flush()
        return self.figures()

    def figures(self) -> dict[str, Any]:
        """The agent's counters, the MR's ODP counters and the slowest operation."""
        out = dict(self.stats)
        mr_counters = self.mr.counters if self.mr is not None else {}
        out.update(mr_counters)
        out["max_op_s"] = round(self.max_op_s, 3)
        out["evictions"] = self.session.evictions
        out["invalidations_received"] = self.session.invalidations_received
        return out

    async def table(self) -> dict[str, Any]:
        """Catch up with hmmd (one round trip), then show the MTT."""
        s = self.session
        try:
            await s.heartbeat()
        except RemoteError as exc:
            s.rehello_if_fenced(exc)  # fenced: no translation may survive
        except (RequestTimeout, DaemonUnavailable):
            pass  # hmmd is gone: the session drops everything once its lease runs out
        mirror = _mirror(self.mr)
        table = mirror.table if mirror is not None else None
        return {
            "pid": self.pid, "start": self.base,
            "mirror": mirror.id if mirror is not None else -1,
            "table": table.tobytes().hex() if table is not None else "",
            "epoch": s.epoch if s.welcome is not None else "", "lost": s.lost,
            "physical": s.physical_frames if s.welcome is not None else True,
            "released": bool(mirror is not None and mirror.released),
            "usable": self.usable(),
        }  # fmt: skip

    async def retarget(self, words: list[str]) -> dict[str, Any]:
        """Register on process PID START_TIME's arena BASE SIZE, logging DMAs to LOG."""
        pid, start_time, base, size = (int(w, 0) for w in words[:4])
        old = (self.pid, self.start_time, self.base, self.size)
        self.pid, self.start_time, self.base, self.size = pid, start_time, base, size
        try:
            await self.register()
        except (AgentError, OSError) as exc:
            self.pid, self.start_time, self.base, self.size = old
            code = getattr(exc, "code", None) or getattr(exc, "errno", None)
            return {"error": f"{type(exc).__name__}: {exc}", "code": int(code or 0)}
        self.flush()
        self.log.close()
        self.log = open(words[4], "ab", buffering=0)  # noqa: SIM115
        return {"ok": True, "mirror": _mirror(self.mr).id if self.mr else -1}  # type: ignore[union-attr]

    async def flood(self, count: int) -> dict[str, Any]:
        """Stop reading and send STATUS requests (about a kilobyte of reply each) until hmmd
        evicts this session, ``count`` are sent, or 20 s pass; then read again.

        hmmd's ``evictions`` and ``messages`` counters are asked on a side connection after
        each burst: this session's own queue (``--small-queue`` makes it deep) stays within
        ``FLOOD_AHEAD`` of what hmmd took, so only hmmd's queue to it can fill. ``lost`` says
        whether the session gave its connection up with no eviction (the flood proved nothing).
        """
        s = self.session
        before = await status(s.endpoint, 5.0)
        sock = s.sock
        s._unwatch()
        sent = 0
        evicted = False
        t0 = time.monotonic()
        try:
            while sent < count and time.monotonic() - t0 < 20:
                now = await status(s.endpoint, 5.0)
                evicted = int(now["evictions"]) > int(before["evictions"])
                if evicted or s.sock is not sock or sock.closed:
                    # Evicted, or the session gave the connection up meanwhile (its lease
                    # lapsed while hmmd was busy): nothing more goes out on it.
                    break
                if sent - (int(now["messages"]) - int(before["messages"])) > FLOOD_AHEAD:
                    await asyncio.sleep(0.002)
                    continue
                for _ in range(min(FLOOD_BURST, count - sent)):
                    send_frames(sock, encode(Status(), s._next_id, 0, ()), True)
                    s._next_id += 1
                    sent += 1
        finally:
            gone = s.sock is not sock or sock.closed
            if not gone:
                s.loop.add_reader(s._fd, s._drain)
                s._drain()
        if not evicted:  # the last burst may have done it
            now = await status(s.endpoint, 5.0)
            evicted = int(now["evictions"]) > int(before["evictions"])
        # A connection given up after hmmd evicted the session is the eviction's doing (the
        # scenario checks hmmd's log says why); one given up before it proves nothing.
        lost = gone and not evicted
        return {
            "sent": sent, "evicted": evicted, "lost": lost,
            "seconds": round(time.monotonic() - t0, 3),
        }  # fmt: skip


async def serve(args: argparse.Namespace) -> None:
    """Connect, register, then answer commands until ``exit`` or EOF."""
    loop = asyncio.get_running_loop()
    # A tiny receive queue, so a flood fills hmmd's send queue quickly, and a deep send
    # queue, so the flood never finds its own queue full.
    small = (
        {int(zmq.RCVHWM): 10, int(zmq.RCVBUF): 4096, int(zmq.SNDHWM): 4 * FLOOD_AHEAD}
        if args.small_queue
        else None
    )
    session = CheckSession(args.endpoint, f"check-{args.index}", 5.0, options=small)
    session.ack_delay = args.ack_delay
    session.broken_ack = args.broken_ack
    session.broken_zap_delay = args.broken_zap_delay
    session.write_shared = args.write_shared
    await session.open()
    agent = Agent(session, args)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        await agent.register()
        say(ready=True, epoch=session.epoch, mirror=_mirror(agent.mr).id)  # type: ignore[union-attr]
        while True:
            line = (await reader.readline()).decode()
            words = line.split()
            if not words or words[0] == "exit":
                break
            cmd = words[0]
            if cmd == "go":
                say(**await agent.go())
            elif cmd == "pause":
                say(**await agent.pause())
            elif cmd == "table":
                say(**await agent.table())
            elif cmd == "retarget":
                say(**await agent.retarget(words[1:]))
            elif cmd == "arm-suicide":
                session.suicide = True
                say(ok=True)
            elif cmd == "flood":
                say(**await agent.flood(int(words[1])))
            else:
                say(error=f"unknown command {cmd!r}")
    finally:
        await agent.pause()
        agent.log.close()
        await agent.nic.close()
        await session.close()


def say(**fields: Any) -> None:
    """One JSON line on stdout."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and serve."""
    p = argparse.ArgumentParser(prog="python -m hmmirror.tools.check.agent")
    p.add_argument("endpoint")
    p.add_argument("index", type=int)
    p.add_argument("seed", type=int)
    p.add_argument("pid", type=int)
    p.add_argument("start_time", type=int)
    p.add_argument("base", type=lambda s: int(s, 0))
    p.add_argument("size", type=int)
    p.add_argument("log")
    p.add_argument("--ack-delay", type=float, default=0.0, help="hold every ACK this long")
    p.add_argument("--broken-ack", action="store_true", help="ACK before zapping (test only)")
    p.add_argument("--broken-zap-delay", type=float, default=3.0)
    p.add_argument("--small-queue", action="store_true", help="a 10-message receive queue")
    p.add_argument("--corrupt-reads", action="store_true", help="log wrong READ data (test only)")
    p.add_argument(
        "--lie-atomics", action="store_true", help="log wrong FETCH_ADD results (test only)"
    )
    p.add_argument(
        "--lie-writes", action="store_true", help="log refused WRITEs as landed (test only)"
    )
    p.add_argument("--write-shared", action="store_true", help="WRITE on the zero page (test only)")
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
