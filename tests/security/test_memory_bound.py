"""Row 6 of issue 11: a peer that asks for 4 MiB reads and never reads its socket.

At 6c59ac2 hmmd's send limit counted messages (SNDHWM 10000) and every queued
DMA reply held its own 4 MiB buffer, so such a peer grew hmmd by hundreds of
MiB a second until the OOM killer came; hm-agent's RDMA replies likewise. Now
a connection's queued reply bytes are capped (``reply_cap``, 32 MiB): beyond
it its requests get EAGAIN, and a peer that stays there without reading past
the ack deadline is evicted.

The attacker is a raw ZeroMQ DEALER whose own queue holds one message
(RCVHWM 1), so its libzmq stops reading at once, as a peer that never reads
its socket does. It sets up a real mirror of a 64 MiB puppet region, faults it
in for the right entries, then sends hundreds of 1024-page ``dma_read``s and
reads nothing. Meanwhile a witness agent (the client library) keeps being
served within a generous deadline, and the process's VmRSS is sampled every
10 ms: it must stay within +100 MiB of its value before the attack. Only
afterwards does the attacker read what came back: a few data replies, EAGAIN
refusals, and its eviction. The same attack on hm-agent uses RDMA READs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import zmq
from hmmirror.client import Access, RemoteError, connect
from hmmirror.client.mlx5 import RdmaPeer
from hmmirror.client.session import status
from hmmirror.proto import ErrorCode, ProtocolError, decode, encode
from hmmirror.proto import messages as M
from hmmirror.proto.entries import to_wire
from hmmirror.testing.puppet import Puppet
from hmmirror.transport import dial

MIB = 1 << 20
PAGE = 4096
#: The attacker's target region, and the size of each read it asks for.
REGION = 64 * MIB
READ_PAGES = 1024
READ_BYTES = READ_PAGES * PAGE
#: Reads the attacker sends, one every ATTACK_GAP s: 1.6 GiB of replies if all were queued.
ATTACK_READS = 400
ATTACK_GAP = 0.02
#: The bound under test: RSS growth during the attack.
RSS_BOUND = 100 * MIB
#: A process that does not bound its replies (6c59ac2) is spared the OOM killer: the
#: attack stops once its RSS grew this much (the test has failed by then).
RSS_ABORT = 400 * MIB
#: How long any one request of the witness may take, under the attack, on a loaded host.
WITNESS_DEADLINE = 5.0
REPLY_TIMEOUT = 5.0
HM_AGENT = [sys.executable, "-m", "hmmirror.tools.agentapp"]

# A lease of 3 s (heartbeat 1 s): the raw attacker sends no heartbeats, only requests; the
# conftest's ack deadline of 1 s is the time a peer may stay at its cap without reading.
pytestmark = [pytest.mark.timeout(150), pytest.mark.hmmd_args("--heartbeat", "1s")]


# --- measuring ------------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    """VmRSS of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's VmRSS every 10 ms on a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = vm_rss(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, vm_rss(self.pid))

    @property
    def growth(self) -> int:
        """Peak minus the value before the attack."""
        return self.peak - self.before

    def stop(self) -> int:
        """Stop sampling; the RSS now."""
        self._stop.set()
        self._thread.join(5)
        return vm_rss(self.pid)


def figures(what: str, rss: RssSampler, after: int) -> str:
    """One line of RSS figures, in MiB (printed for the record, and in failure messages)."""
    return (
        f"{what} VmRSS before {rss.before / MIB:.1f} MiB, peak {rss.peak / MIB:.1f} MiB "
        f"(+{rss.growth / MIB:.1f}), after {after / MIB:.1f} MiB"
    )


# --- the never-reading peer -----------------------------------------------------------------


class NeverReader:
    """A raw DEALER that reads its replies during setup, then sends requests and reads none.

    Its own libzmq queue holds one message (RCVHWM 1): once that is full its I/O thread
    stops reading the socket, like a peer that never calls recv on a plain socket.
    """

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        options = {zmq.RCVHWM: 1, zmq.SNDHWM: 100_000}
        self.sock = dial(ctx, endpoint, options=options)
        self.next_id = 0
        self.sent = 0

    def send(self, msg: M.Message, bulk: Any = ()) -> int:
        """Queue ``msg`` without blocking; its id."""
        self.next_id += 1
        self.sock.send_multipart(encode(msg, self.next_id, bulk=bulk), flags=zmq.NOBLOCK)
        self.sent += 1
        return self.next_id

    async def recv(self, timeout: float = REPLY_TIMEOUT) -> Any:
        """The next message, decoded (None if nothing came within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                await asyncio.sleep(0.005)
                continue
            return decode(frames)
        return None

    async def ask(self, msg: M.Message, bulk: Any = ()) -> Any:
        """Send ``msg`` and return its reply (setup only: the attack reads nothing)."""
        msg_id = self.send(msg, bulk)
        while True:
            env = await self.recv()
            assert env is not None, f"no reply to {msg.TYPE} in {REPLY_TIMEOUT} s"
            if env.re == msg_id:
                return env

    async def drain(self, quiet: float = 1.0, limit: float = 30.0) -> list[Any]:
        """Everything that came back, once nothing more arrives for ``quiet`` s."""
        got: list[Any] = []
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                env = await self.recv(quiet)
            except ProtocolError:
                continue
            if env is None:
                break
            got.append(env)
        return got

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(linger=0)


@contextlib.asynccontextmanager
async def never_reader(endpoint: str) -> AsyncIterator[NeverReader]:
    """A NeverReader on its own context, closed afterwards."""
    ctx: zmq.Context[Any] = zmq.Context()
    peer = NeverReader(ctx, endpoint)
    try:
        yield peer
    finally:
        peer.close()
        ctx.term()


def tally(replies: list[Any]) -> tuple[Counter[str], list[str]]:
    """Counts of what came back by type (errors by code name), and the eviction reasons."""
    kinds: Counter[str] = Counter()
    evicted: list[str] = []
    for env in replies:
        if isinstance(env.msg, M.Error):
            kinds[ErrorCode(env.msg.code).name] += 1
        else:
            kinds[env.type] += 1
        if isinstance(env.msg, M.Evicted):
            evicted.append(env.msg.reason)
    return kinds, evicted


# --- the witness ----------------------------------------------------------------------------


@dataclass
class Witness:
    """What a well-behaved requester got while the attack ran."""

    served: int = 0
    slowest: float = 0.0
    failures: list[str] = field(default_factory=list)

    async def keep_going(self, step: Callable[[], Any], stop: asyncio.Event) -> None:
        """Run ``step`` back to back until ``stop``, each under WITNESS_DEADLINE."""
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(WITNESS_DEADLINE):
                    await step()
            except Exception as exc:  # recorded: the test fails on any
                self.failures.append(f"{type(exc).__name__}: {exc}")
                return
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.served += 1
            await asyncio.sleep(0.01)

    def check(self, what: str) -> None:
        """The witness was served throughout, each request within the deadline."""
        assert not self.failures, f"{what} was not served during the attack: {self.failures}"
        assert self.served >= 20, f"{what} was served only {self.served} times during the attack"


async def attack(
    pid: int, send_read: Callable[[int], None], witness_step: Callable[[], Any]
) -> tuple[int, RssSampler, int, Witness]:
    """Send ATTACK_READS reads, ATTACK_GAP s apart (stopping early past RSS_ABORT), while the
    witness keeps going; (reads sent, the RSS of ``pid`` sampled, its RSS after, the witness)."""
    stop = asyncio.Event()
    witness = Witness()
    witnessing = asyncio.ensure_future(witness.keep_going(witness_step, stop))
    rss = RssSampler(pid)
    sent = ATTACK_READS
    try:
        for i in range(ATTACK_READS):
            send_read(i)
            if rss.growth > RSS_ABORT:
                sent = i + 1
                break
            await asyncio.sleep(ATTACK_GAP)
    finally:
        stop.set()
        await witnessing
    return sent, rss, rss.stop(), witness


# --- hmmd -----------------------------------------------------------------------------------


async def test_a_peer_that_never_reads_cannot_grow_hmmd_and_is_evicted(
    hmmd: Any, puppet: Puppet, agent: Any
) -> None:
    addr = await puppet.mmap(REGION, populate=True)
    pattern = bytes(range(256)) * (PAGE // 256)
    await puppet.write(addr, pattern * 16)

    async with agent("witness") as session, never_reader(hmmd.endpoint) as peer:
        mirror = await session.mirror(puppet.pid, addr, 16 * PAGE * 64, Access.READ)

        async def witness_step() -> None:
            got = await mirror.read(addr, 256)  # a 1 MiB DMA read: hmmd's pooled buffers
            assert got.data[: 16 * PAGE] == pattern * 16, "the witness read wrong data"
            await mirror.snapshot(addr + 512 * PAGE, 64)  # and a fault

        for _ in range(5):
            await witness_step()  # warm: the witness's own buffers exist before "before"

        # The attacker: a session, a mirror of the whole region, its entries, then reads.
        assert isinstance((await peer.ask(M.Hello(agent="never-reads", pid=1))).msg, M.Welcome)
        reg = M.Register(pid=puppet.pid, start_time=0, intervals=((addr, addr + REGION),), access=1)
        env = await peer.ask(reg)
        assert isinstance(env.msg, M.Registered), env
        mirror_id = env.msg.mirror
        npages = REGION // PAGE
        fault = M.Fault(mirror=mirror_id, start=addr, npages=npages, write=False, mode=1)
        env = await peer.ask(fault)
        assert isinstance(env.msg, M.FaultReply), env
        entries = np.frombuffer(env.bulk[0], dtype="<u8").copy()

        def send_read(i: int) -> None:
            k = i % (REGION // READ_BYTES)
            wire = to_wire(entries[k * READ_PAGES : (k + 1) * READ_PAGES])
            start = addr + k * READ_BYTES
            peer.send(M.DmaRead(mirror=mirror_id, start=start, npages=READ_PAGES), [wire])

        sent, rss, after, witness = await attack(hmmd.proc.pid, send_read, witness_step)
        line = figures("hmmd", rss, after)
        print(f"\n{line}; {sent} reads of {READ_BYTES // MIB} MiB sent, never read")
        assert rss.growth < RSS_BOUND, f"{line}: a peer that never reads grew hmmd"
        witness.check("the witness agent")
        print(f"witness: {witness.served} reads and faults, slowest {witness.slowest:.3f} s")

        stats = await status(hmmd.endpoint)
        kinds, evicted = tally(await peer.drain())
        print(f"the attacker got back: {dict(kinds)}; status {stats['reply_refusals']} refusals")
        data = kinds["dma_read_reply"]
        assert data < sent // 4, f"{data} of {sent} reads were answered with data: {kinds}"
        # The eviction also disconnects it, dropping what was queued for it (its EAGAINs and
        # the EVICTED notice among them): hmmd's own figures and log say what happened.
        assert stats["reply_refusals"] > 0, f"nothing was refused with EAGAIN: {stats}"
        assert stats["reply_refusals"] >= kinds["EAGAIN"]
        assert stats["reply_evictions"] >= 1
        assert "queued replies" in hmmd.stderr(), "not evicted for not reading"
        assert not evicted or "queued replies" in evicted[0]
        assert hmmd.proc.poll() is None


async def test_a_peer_that_never_reads_cannot_flood_hmmds_log(hmmd: Any) -> None:
    """Every reply hmmd could not queue for a peer was one log line: a peer that sends cheap
    requests and never reads had hmmd write thousands of lines a second (and spend its loop
    on them). Now a burst is logged, then how many were not."""
    async with never_reader(hmmd.endpoint) as peer:
        assert isinstance((await peer.ask(M.Hello(agent="never-reads", pid=1))).msg, M.Welcome)
        deadline = time.monotonic() + 20.0
        while peer.sent < 30_000 and time.monotonic() < deadline:
            try:
                peer.send(M.Status())
            except zmq.Again:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)  # hmmd answers what it took
        stats = await status(hmmd.endpoint)
    dropped = hmmd.stderr().count("dropped: ")
    print(f"\n{peer.sent} status requests never read: {dropped} lines of dropped replies")
    assert stats["evictions"] >= 1, f"the peer was never evicted: {stats}"
    assert 1 <= dropped <= 25, f"{dropped} log lines for replies dropped to one peer"
    # Sessions opened and closed back to back: hmmd says so, within a budget.
    async with never_reader(hmmd.endpoint) as churner:
        for _ in range(3000):
            churner.send(M.Hello(agent="churner", pid=1))
            churner.send(M.Goodbye())
        until = time.monotonic() + 20.0
        while (await status(hmmd.endpoint))["messages"] < stats["messages"] + 6000:
            assert time.monotonic() < until, "hmmd did not take 6000 messages in 20 s"
            await asyncio.sleep(0.05)
    opened = hmmd.stderr().count("opened by churner")
    print(f"3000 sessions opened and closed: {opened} lines of them")
    assert 1 <= opened <= 120, f"{opened} log lines for one peer's sessions"
    assert hmmd.proc.poll() is None


#: A hoarder: mirror ``count`` ranges of ``pages`` pages of this very process (a user may
#: always mirror its own; the ranges need not be mapped), back to back, until refused; say
#: how far it got (a JSON line) and hold them until stdin closes; then close the session and
#: mirror once more, and say so. argv: endpoint, pages, count.
HOARDER = r"""
import asyncio, json, os, sys
from hmmirror.client import RemoteError, connect
from hmmirror.proto import ErrorCode
async def main():
    endpoint, pages, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    got, refusal, base = 0, None, 0x100000000000
    async with connect(endpoint, name="hoarder") as s:
        for i in range(count):
            try:
                await s.mirror(os.getpid(), base + i * pages * 4096, pages * 4096)
            except RemoteError as exc:
                refusal = [ErrorCode(exc.code).name, exc.message]
                break
            got += 1
        print(json.dumps({"got": got, "refusal": refusal}), flush=True)
        await asyncio.to_thread(sys.stdin.read)
    async with connect(endpoint, name="hoarder-again") as s:
        await s.mirror(os.getpid(), base, pages * 4096)  # the first session's share is back
    print(json.dumps({"again": True}), flush=True)
asyncio.run(main())
"""


async def hoard(user: Any, endpoint: str, pages: int, pid: int) -> tuple[dict[str, Any], int]:
    """Run HOARDER as ``user``: how far it got, and process ``pid``'s mappings meanwhile."""
    proc = user.popen(user.python(HOARDER, endpoint, str(pages), "4096"))
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        assert line, proc.stderr.read()
        held = map_count(pid)
        out, err = await asyncio.to_thread(proc.communicate, "", 60)
        assert proc.returncode == 0 and json.loads(out) == {"again": True}, err
        return json.loads(line), held
    finally:
        if proc.poll() is None:
            proc.kill()


def map_count(pid: int) -> int:
    """How many mappings process ``pid`` has."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.hmmd_args("--heartbeat", "1s", "--max-mirrors-per-peer", "200")
async def test_a_user_cannot_make_hmmd_hold_mirror_after_mirror(
    hmmd: Any, hmmd_group: str, make_user: Any
) -> None:
    """A mirror holds shadow arrays of 8 bytes per page of its range, each array a mapping of
    hmmd's once large, and any user may mirror its own process, mapped or not: with no cap,
    a user registering mirror after mirror ran hmmd out of mappings (vm.max_map_count) and
    memory. Now a peer holds at most ``max_mirror_pages_per_peer`` pages (1 TiB) and
    ``max_mirrors_per_peer`` mirrors; past either, TOO_LARGE, and a closed session gives
    its share back."""
    mallory = make_user(groups=(hmmd_group,))
    maps_before = map_count(hmmd.proc.pid)
    large, maps_held = await hoard(mallory, hmmd.endpoint, 1 << 25, hmmd.proc.pid)
    many, _ = await hoard(mallory, hmmd.endpoint, 1, hmmd.proc.pid)
    stats = await status(hmmd.endpoint)
    print(
        f"\nmirrors of 2^25 pages: {large['got']} before {large['refusal']}; hmmd's mappings "
        f"{maps_before} -> {maps_held}\nmirrors of 1 page: {many['got']} before {many['refusal']}"
    )
    assert large["got"] == 8 and large["refusal"][0] == "TOO_LARGE", large  # 8 x 2^25 = 2^28
    assert "max_mirror_pages_per_peer" in large["refusal"][1], large
    assert maps_held < maps_before + 64, f"hmmd's mappings grew {maps_before} -> {maps_held}"
    assert many["got"] == 200 and "max_mirrors_per_peer" in many["refusal"][1], many
    assert stats["mirror_refusals"] == 2 and stats["mirrors"] == 0, stats
    assert hmmd.proc.poll() is None


@pytest.mark.hmmd_args("--heartbeat", "1s", "--max-mirrors", "16")
async def test_max_mirrors_caps_every_agent_root_included(hmmd: Any, puppet: Puppet) -> None:
    addr = await puppet.mmap(PAGE)
    async with connect(hmmd.endpoint, name="root-hoarder") as session:
        for _ in range(16):
            await session.mirror(puppet.pid, addr, PAGE)
        with pytest.raises(RemoteError) as full:
            await session.mirror(puppet.pid, addr, PAGE)
    assert full.value.code == ErrorCode.TOO_LARGE and "max_mirrors" in full.value.message


# --- hm-agent -------------------------------------------------------------------------------


@dataclass
class HmAgent:
    """A running hm-agent: its process, RDMA endpoint and the rkey of its one MR."""

    proc: asyncio.subprocess.Process
    endpoint: str
    rkey: int


@contextlib.asynccontextmanager
async def hm_agent(hmmd: Any, spec: str) -> AsyncIterator[HmAgent]:
    """hm-agent serving one MR ``spec`` on tcp loopback; SIGTERM (then SIGKILL) afterwards."""
    args = ["--daemon", hmmd.endpoint, "--listen", "tcp://127.0.0.1:0", "--mr", spec]
    args += ["--insecure", "--grant", "any:*:r"]  # a raw peer without CURVE keys
    proc = await asyncio.create_subprocess_exec(
        *HM_AGENT, *args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        async with asyncio.timeout(10):
            while not lines or not lines[-1].startswith("hm-agent ready "):
                raw = await proc.stdout.readline()
                assert raw, f"hm-agent exited before it was ready: {lines}"
                lines.append(raw.decode().strip())
        rkeys = [m.group(1) for ln in lines if (m := re.search(r"rkey=(0x[0-9a-f]+)", ln))]
        yield HmAgent(proc, lines[-1].split()[-1], int(rkeys[0], 16))
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_a_requester_that_never_reads_cannot_grow_hm_agent(hmmd: Any, puppet: Puppet) -> None:
    addr = await puppet.mmap(REGION, populate=True)
    pattern = os.urandom(16 * PAGE)
    await puppet.write(addr, pattern)

    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{REGION}:r") as nic,
        RdmaPeer.connect(nic.endpoint) as witness_peer,
        never_reader(nic.endpoint) as peer,
    ):

        async def witness_step() -> None:
            got = await witness_peer.read(nic.rkey, addr, 16 * PAGE)
            assert bytes(got) == pattern, "the witness read wrong data"

        for _ in range(5):
            await witness_step()

        def send_read(i: int) -> None:
            at = addr + (i % (REGION // READ_BYTES)) * READ_BYTES
            peer.send(M.RdmaRead(rkey=nic.rkey, addr=at, length=READ_BYTES))

        sent, rss, after, witness = await attack(nic.proc.pid, send_read, witness_step)
        line = figures("hm-agent", rss, after)
        print(f"\n{line}; {sent} RDMA READs of {READ_BYTES // MIB} MiB sent, never read")
        assert rss.growth < RSS_BOUND, f"{line}: a requester that never reads grew hm-agent"
        witness.check("the witness requester")
        print(f"witness: {witness.served} reads, slowest {witness.slowest:.3f} s")

        kinds, _ = tally(await peer.drain())
        print(f"the attacker got back: {dict(kinds)}")
        data = kinds["rdma_read_reply"]
        assert data < sent // 4, f"{data} of {sent} reads were answered with data: {kinds}"
        assert kinds["EAGAIN"] > 0, f"nothing was refused with EAGAIN: {kinds}"
        assert nic.proc.returncode is None


# --- an agent that reads is only slowed -----------------------------------------------------


@pytest.mark.hmmd_args("--heartbeat", "1s", "--reply-cap", "8MiB")
async def test_an_agent_that_reads_but_pipelines_past_its_cap_is_only_slowed(
    hmmd: Any, puppet: Puppet, agent: Any
) -> None:
    addr = await puppet.mmap(REGION, populate=True)
    pattern = os.urandom(PAGE)
    await puppet.write(addr + 5 * READ_BYTES, pattern)
    async with agent("pipeliner") as session:
        mirror = await session.mirror(puppet.pid, addr, REGION, Access.READ)
        await mirror.fault(addr, REGION // PAGE)
        # 24 reads of 4 MiB at once, through a cap of 8 MiB: hmmd refuses most of them at
        # first (EAGAIN), and the client asks again as its socket drains.
        reads = await asyncio.gather(
            *(mirror.read(addr + (i % 16) * READ_BYTES, READ_PAGES) for i in range(24))
        )
        assert all(len(r.data) == READ_BYTES for r in reads)
        assert reads[5].data[:PAGE] == pattern
        stats = await status(hmmd.endpoint)
        print(f"\n24 reads of 4 MiB through an 8 MiB cap: {stats['reply_refusals']} refusals")
        assert stats["reply_refusals"] > 0, "the cap was never met: this test tests nothing"
        assert stats["evictions"] == 0
