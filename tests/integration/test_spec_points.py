"""proto/SPEC.md's fine print, pinned against a real hmmd driven by raw ZeroMQ peers.

Each test is one point an implementer writing an agent from SPEC.md alone had to
find out (issue 14, section 1): what ``invalidate.n`` counts, which code a lapsed
lease gets, which event a COW-breaking device write sends, who gets a watcher's
invalidation, the ``register`` flags, ``re`` of a refused envelope, ``unregister``
after RELEASE, what ``bad_messages`` counts, what is handled in order, and the
integer bounds. The peers are hand-driven DEALERs, so nothing of the Python client
stands between the wire and the assertion.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
from hmmirror.proto import ErrorCode
from hmmirror.proto.codec import Envelope
from hmmirror.proto.entries import HMM_PFN_VALID, HMM_PFN_WRITE, from_wire
from hmmirror.proto.messages import (
    Ack,
    DmaRead,
    DmaReadReply,
    DmaWrite,
    Error,
    Event,
    Evicted,
    Fault,
    FaultReadReply,
    FaultReply,
    Heartbeat,
    Ok,
    Register,
    Registered,
    SyncRange,
    Unregister,
    Welcome,
)
from hmmirror.testing.rawpeer import POPULATE, raw_peer

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
PID_MAX_EVER = 1 << 22  # the kernel's PID_MAX_LIMIT: no process has a larger pid


def refused(env: Envelope, code: ErrorCode) -> str:
    """Assert ``env`` is an ``error`` with ``code``; return its message."""
    assert isinstance(env.msg, Error), env.msg
    assert env.msg.code == code, (ErrorCode(env.msg.code).name, env.msg.message)
    return env.msg.message


# --- 1. invalidate.n is per session ------------------------------------------------------------


async def test_invalidate_n_counts_per_session_from_1_again_after_a_second_hello(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"n" * PAGE)
    async with raw_peer(hmmd.endpoint) as a, raw_peer(hmmd.endpoint) as target:
        await target.hello("target")
        for session in range(2):
            await a.hello()  # the second one, on the same connection, opens a fresh session
            mirror = await a.register(puppet.pid, addr, addr + PAGE)
            for n in (1, 2):
                await a.populate(mirror, addr, 1)
                sync = target.send(
                    SyncRange(pid=puppet.pid, ranges=((addr, addr + PAGE),), event=1)
                )
                inv = await a.invalidate()
                assert (inv.n, inv.mirror) == (n, mirror), (session, inv)
                a.send(Ack(n=inv.n))
                assert isinstance((await target.reply(sync)).msg, Ok)


# --- 2. a lapsed lease: evicted, then NO_SESSION -------------------------------------------------


async def test_after_the_lease_lapses_the_session_is_forgotten_and_requests_get_no_session(hmmd):
    async with raw_peer(hmmd.endpoint) as a:
        welcome = await a.hello()
        evicted = await a.recv(welcome.lease_ms / 1000 + 2.0)  # no heartbeat sent
        assert isinstance(evicted.msg, Evicted) and "lease" in evicted.msg.reason
        refused(await a.request(Heartbeat()), ErrorCode.NO_SESSION)
        again = await a.hello()  # the way back, as after FENCED
        assert again.session == welcome.session + 1


# --- 3. hmmd's own COW-breaking write sends CLEAR ------------------------------------------------


# The proc watcher polls once, at attach, and then not within the test: hmmd's own check
# after the write finds the new page (a poll that saw it first says CLEAR too: next test).
@pytest.mark.hmmd_args("--poll-interval", "30s", "--poll-max", "30s")
async def test_a_dma_write_that_breaks_cow_invalidates_the_old_page_with_clear(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"p" * PAGE)
    child = None
    try:
        async with raw_peer(hmmd.endpoint) as a:
            await a.hello()
            mirror = await a.register(puppet.pid, addr, addr + PAGE)
            entries = await a.populate(mirror, addr, 1, write=True)
            entry = int(from_wire(entries, 1)[0])
            assert entry & HMM_PFN_VALID and entry & HMM_PFN_WRITE  # the target's page alone
            # The page is now shared, copy-on-write, with the child; no poll has seen it
            # (a write fault now would break COW first: SPEC §7.2).
            child = await puppet.fork()
            write = a.send(DmaWrite(mirror=mirror, start=addr, npages=1), [entries, b"w" * PAGE])
            inv = await a.invalidate()
            assert [tuple(item) for item in inv.items] == [
                (inv.items[0][0], addr, addr + PAGE, Event.CLEAR)
            ], inv.items
            a.send(Ack(n=inv.n))
            assert isinstance((await a.reply(write)).msg, Ok)
            assert await puppet.read(addr, PAGE) == b"w" * PAGE
            assert await child.read(addr, PAGE) == b"p" * PAGE
    finally:
        if child is not None:
            await child.exit()


async def test_a_cow_break_that_the_watcher_sees_is_clear_too(hmmd, puppet):
    """The target's own write after a fork replaces the page it shared with the child: the
    kernel notifies that COW break as CLEAR, and so does hmmd's poll, which sees a new,
    now exclusive page (it said MIGRATE, as for a migration)."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"p" * PAGE)
    child = await puppet.fork()
    try:
        async with raw_peer(hmmd.endpoint) as a:
            await a.hello()
            mirror = await a.register(puppet.pid, addr, addr + PAGE)
            await a.populate(mirror, addr, 1)  # the shared page, read-only
            await puppet.write(addr, b"q" * PAGE)  # the target breaks COW itself
            inv = await a.invalidate()
            assert [tuple(item)[1:] for item in inv.items] == [(addr, addr + PAGE, Event.CLEAR)]
            a.send(Ack(n=inv.n))
    finally:
        await child.exit()


# --- 4. a watcher's change reaches every overlapping mirror, if any mirror holds the page -----


async def test_a_watched_change_goes_to_every_overlapping_mirror_only_if_one_holds_the_page(
    hmmd, puppet
):
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, b"h" * 2 * PAGE)
    async with raw_peer(hmmd.endpoint) as holder, raw_peer(hmmd.endpoint) as bystander:
        await holder.hello("holder")
        await bystander.hello("bystander")
        held = await holder.register(puppet.pid, addr, addr + 2 * PAGE)
        other = await bystander.register(puppet.pid, addr, addr + 2 * PAGE)
        await holder.populate(held, addr, 1)  # only the first page is held, by one mirror
        await puppet.madvise(addr + PAGE, PAGE, "dontneed")  # a page nobody holds
        await holder.quiet(0.5)  # the proc watcher polls every 50 ms at the slowest
        await bystander.quiet(0.1)
        await puppet.madvise(addr, PAGE, "dontneed")
        for peer, mirror in ((holder, held), (bystander, other)):
            inv = await peer.invalidate()
            assert inv.mirror == mirror
            assert [tuple(item)[1:] for item in inv.items] == [(addr, addr + PAGE, Event.CLEAR)]
            peer.send(Ack(n=inv.n))


# --- 5. register's flags ---------------------------------------------------------------------


async def test_watch_writes_without_a_userfaultfd_says_how_to_get_one(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    async with raw_peer(hmmd.endpoint) as a:
        await a.hello()
        for flag in ("watch_writes", "strict_writes"):
            msg = Register(
                pid=puppet.pid, start_time=0, intervals=((addr, addr + PAGE),), access=1,
                **{flag: True},
            )  # fmt: skip
            text = refused(await a.request(msg), ErrorCode.EINVAL)
            assert flag in text and "expose(" in text and "uffd = inject" in text, text
            assert "uffd = off" not in text, text  # hmmd runs with the default, cooperate


async def test_register_flags_are_msgpack_bools_and_an_integer_is_refused(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    async with raw_peer(hmmd.endpoint) as a:
        await a.hello()
        header = msgpack.packb({"v": [1, 0], "type": "register", "id": 41, "re": 0})
        body = {"pid": puppet.pid, "start_time": 0, "intervals": [[addr, addr + PAGE]], "access": 1}
        ok = await a.send_frames([b"", header, msgpack.packb({**body, "watch_writes": False})])
        assert isinstance(ok.msg, Registered) and ok.re == 41
        env = await a.send_frames([b"", header, msgpack.packb({**body, "watch_writes": 1})])
        assert env.re == 41
        refused(env, ErrorCode.BAD_MESSAGE)


# --- 6. re of a refused envelope ---------------------------------------------------------------


async def test_re_is_the_request_id_once_the_header_decoded_whole_else_0(hmmd):
    async with raw_peer(hmmd.endpoint) as a:
        good = {"v": [1, 0], "type": "status", "id": 9, "re": 0}
        body = msgpack.packb({})
        # The header decoded whole: re names the request, whatever is wrong after it.
        env = await a.send_frames([b"", msgpack.packb(good), b"\xc1"])
        assert env.re == 9
        refused(env, ErrorCode.BAD_MESSAGE)
        env = await a.send_frames([b"", msgpack.packb({**good, "v": [2, 0]}), body])
        assert env.re == 9
        refused(env, ErrorCode.VERSION_MISMATCH)
        for mtype in ("bogus", "ok"):  # unknown to the codec; known, but not served by hmmd
            env = await a.send_frames([b"", msgpack.packb({**good, "type": mtype}), body])
            assert env.re == 9
            refused(env, ErrorCode.UNKNOWN_MESSAGE)
        # The envelope failed before the header decoded whole: re is 0, readable id or not.
        for frames in (
            [b"", msgpack.packb(good)],  # two frames
            [b"x", msgpack.packb(good), body],  # a delimiter that is not empty
            [b"", msgpack.packb({**good, "re": -1}), body],  # a bad re
            [b"", msgpack.packb({**good, "v": [1]}), body],  # a bad v
        ):
            env = await a.send_frames(frames)
            assert env.re == 0, frames
            refused(env, ErrorCode.BAD_MESSAGE)


# --- 7. unregister after RELEASE ---------------------------------------------------------------


async def test_a_mirror_release_ended_is_no_mirror_to_unregister_even_before_the_ack(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"r" * PAGE)
    async with raw_peer(hmmd.endpoint) as a:
        await a.hello()
        mirror = await a.register(puppet.pid, addr, addr + PAGE)
        await a.populate(mirror, addr, 1)
        await puppet.exit()
        inv = await a.invalidate()
        assert [item[3] for item in inv.items] == [Event.RELEASE]
        # Not acked yet, so hmmd still counts the mirror: it is dead all the same.
        refused(await a.request(Unregister(mirror=mirror)), ErrorCode.NO_MIRROR)
        fault = Fault(mirror=mirror, start=addr, npages=1, write=False, mode=POPULATE)
        refused(await a.request(fault), ErrorCode.ESRCH)
        a.send(Ack(n=inv.n))
        deadline = time.monotonic() + 5
        while (await a.stats())["mirrors"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        refused(await a.request(Unregister(mirror=mirror)), ErrorCode.NO_MIRROR)
        refused(await a.request(fault), ErrorCode.NO_MIRROR)


# --- 8. what bad_messages counts ---------------------------------------------------------------


async def test_bad_messages_counts_undecodable_sessionless_einval_and_too_large_only(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    async with raw_peer(hmmd.endpoint) as a, raw_peer(hmmd.endpoint) as stranger:
        await a.hello()
        before = (await a.stats())["bad_messages"]
        counted = [
            (a, Register(pid=0, start_time=0, intervals=((addr, addr + PAGE),), access=1),
             ErrorCode.EINVAL),
            (a, Register(pid=puppet.pid, start_time=0, intervals=((0, 1 << 40),), access=1),
             ErrorCode.TOO_LARGE),
            (a, Ack(n=7), ErrorCode.EINVAL),
            (stranger, Heartbeat(), ErrorCode.NO_SESSION),
        ]  # fmt: skip
        not_counted = [
            (a, Unregister(mirror=999), ErrorCode.NO_MIRROR),
            (a, Register(pid=PID_MAX_EVER + 1, start_time=0, intervals=((addr, addr + PAGE),),
                         access=1), ErrorCode.ESRCH),
        ]  # fmt: skip
        for peer, msg, code in counted + not_counted:
            refused(await peer.request(msg), code)
        assert isinstance((await a.send_frames([b"", b"\xc1", b"\x80"])).msg, Error)  # undecodable
        assert (await a.stats())["bad_messages"] == before + len(counted) + 1


# --- 9. ordering, the DMA fence, and a fault held by the agent's own unacked invalidate -------


async def test_one_connections_requests_take_effect_in_the_order_sent(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"0" * PAGE)
    async with raw_peer(hmmd.endpoint) as a:
        await a.hello()
        mirror = await a.register(puppet.pid, addr, addr + PAGE)
        entries = await a.populate(mirror, addr, 1, write=True)
        ids = []
        for i in range(1, 20):
            data = bytes([i]) * PAGE
            ids.append(a.send(DmaWrite(mirror=mirror, start=addr, npages=1), [entries, data]))
            ids.append(a.send(DmaRead(mirror=mirror, start=addr, npages=1), [entries]))
        for i, (write, read) in enumerate(zip(ids[::2], ids[1::2], strict=True), start=1):
            assert isinstance((await a.reply(write)).msg, Ok)
            env = await a.reply(read)
            assert isinstance(env.msg, DmaReadReply) and bytes(env.bulk[0]) == bytes([i]) * PAGE


async def test_a_fault_with_read_overlapping_an_unacked_invalidate_waits_for_the_ack(hmmd, puppet):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"f" * PAGE)
    async with raw_peer(hmmd.endpoint) as a, raw_peer(hmmd.endpoint) as target:
        await a.hello()
        await target.hello("target")
        mirror = await a.register(puppet.pid, addr, addr + PAGE)
        await a.populate(mirror, addr, 1)
        sync = target.send(SyncRange(pid=puppet.pid, ranges=((addr, addr + PAGE),), event=1))
        inv = await a.invalidate()
        fault = a.send(
            Fault(mirror=mirror, start=addr, npages=1, write=False, mode=POPULATE, read=True)
        )
        with pytest.raises(asyncio.TimeoutError):
            await a.reply(fault, 0.5)  # held: the window this agent's own ack closes is open
        a.send(Ack(n=inv.n))
        env = await a.reply(fault)
        assert isinstance(env.msg, FaultReadReply | FaultReply), env.msg
        assert isinstance((await target.reply(sync)).msg, Ok)


# --- 10. ids and integer bounds ----------------------------------------------------------------


async def test_session_ids_count_from_1_in_each_epoch_and_pids_stop_at_2_32_minus_1(hmmd):
    async with raw_peer(hmmd.endpoint) as a, raw_peer(hmmd.endpoint) as b:
        assert (await a.hello()).session == 1  # a fresh hmmd: a new epoch
        assert (await b.hello()).session == 2
        assert (await a.hello()).session == 3
        for pid in ((1 << 32) - 1, 1 << 32):
            header = msgpack.packb({"v": [1, 0], "type": "hello", "id": 50, "re": 0})
            env = await b.send_frames([b"", header, msgpack.packb({"agent": "big", "pid": pid})])
            assert env.re == 50
            if pid < 1 << 32:
                assert isinstance(env.msg, Welcome)
            else:
                refused(env, ErrorCode.TOO_LARGE)


async def test_a_refused_ack_answers_the_acks_own_id(hmmd):
    async with raw_peer(hmmd.endpoint) as a:
        await a.hello()
        ack = a.send(Ack(n=3), id=77)
        env = await a.reply(ack)
        assert env.re == 77
        refused(env, ErrorCode.EINVAL)


async def test_integers_must_be_msgpack_integers_not_floats(hmmd):
    async with raw_peer(hmmd.endpoint) as a:
        await a.hello()
        header = msgpack.packb({"v": [1, 0], "type": "unregister", "id": 60, "re": 0})
        env = await a.send_frames([b"", header, msgpack.packb({"mirror": float(1 << 33)})])
        assert env.re == 60
        refused(env, ErrorCode.BAD_MESSAGE)
        env = await a.send_frames([b"", header, msgpack.packb({"mirror": 1 << 33})])
        refused(env, ErrorCode.NO_MIRROR)
