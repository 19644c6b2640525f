"""The shared-memory DMA window (SPEC §4.9) through ``hm-agent``, and agents that do without.

A real hmmd (ipc), a real puppet target and a real ``hm-agent`` process, whose
READs and WRITEs of 64 KiB and more go through a memfd it shares with hmmd
(``--dma-window``, on by default); hmmd's ``status`` says how many DMAs took
that path (``window_reads``, ``window_writes``). The requester is an
``RdmaPeer`` on tcp loopback (``hmmirror.testing.rdma``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from typing import Any

import msgpack
import pytest
from hmmirror.client import DeviceError, connect
from hmmirror.client.session import status
from hmmirror.proto import ErrorCode
from hmmirror.proto.codec import encode
from hmmirror.proto.messages import (
    Access,
    DmaRead,
    DmaReadReply,
    Error,
    Hello,
    Message,
    Register,
    Registered,
    Welcome,
    WindowOpen,
)
from hmmirror.testing.rawpeer import RawPeer, raw_peer
from hmmirror.testing.rdma import DEADLINE, HM_AGENT, hm_agent

PAGE = 4096


async def figures(hmmd: Any) -> dict[str, Any]:
    """hmmd's status figures."""
    return dict(await status(hmmd.endpoint))


def delta(after: dict[str, Any], before: dict[str, Any], key: str) -> int:
    """How much figure ``key`` grew."""
    return int(after[key]) - int(before[key])


async def test_hm_agent_reads_and_writes_through_its_window(hmmd, puppet):
    size = 1 << 20
    addr = await puppet.mmap(size)
    data = os.urandom(size)
    await puppet.write(addr, data)
    before = await figures(hmmd)
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{size}:rw") as agent,
        agent.peer() as peer,
    ):
        (rkey,) = agent.rkeys
        assert bytes(await peer.read(rkey, addr, size)) == data
        assert bytes(await peer.read(rkey, addr + 100, 300_000)) == data[100:300_100]
        # Many at once: each takes its own slot, and none overwrites another's data.
        reads = [peer.read(rkey, addr + i * 65536, 200_000) for i in range(10)]
        for i, got in enumerate(await asyncio.gather(*reads)):
            assert bytes(got) == data[i * 65536 : i * 65536 + 200_000], i
        new = os.urandom(500_000)
        await peer.write(rkey, addr + 4093, new)  # unaligned, across pages
        assert await puppet.read(addr + 4093, len(new)) == new
        writes = [os.urandom(70_000) for _ in range(6)]
        await asyncio.gather(
            *(peer.write(rkey, addr + i * 80_000 + 7, w) for i, w in enumerate(writes))
        )
        for i, w in enumerate(writes):
            assert await puppet.read(addr + i * 80_000 + 7, len(w)) == w
        during = await figures(hmmd)
    after = await figures(hmmd)
    assert during["windows"] == before["windows"] + 1, "the agent attached one window"
    assert delta(during, before, "window_reads") >= 12
    assert delta(during, before, "window_writes") >= 7
    assert after["windows"] == before["windows"], "the window ended with the session"


async def test_no_stale_data_after_an_invalidation(hmmd, puppet):
    npages = 256
    addr = await puppet.mmap(npages * PAGE)
    data = os.urandom(npages * PAGE)
    await puppet.write(addr, data)
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{npages * PAGE}:rw") as agent,
        agent.peer() as peer,
    ):
        (rkey,) = agent.rkeys
        before = await figures(hmmd)
        assert bytes(await peer.read(rkey, addr, npages * PAGE)) == data  # translations held
        # The target drops half of the pages: the window's slots still hold the old bytes,
        # and the agent's translations are zapped; what it serves must be the zeros.
        await puppet.madvise(addr, 64 * PAGE, "dontneed")
        got = bytes(await peer.read(rkey, addr, 128 * PAGE))
        assert got[: 64 * PAGE] == bytes(64 * PAGE)
        assert got[64 * PAGE :] == data[64 * PAGE : 128 * PAGE]
        # The CPU writes new data over the zero pages (new frames): served fresh, not stale.
        fresh = os.urandom(128 * PAGE)
        await puppet.write(addr, fresh)
        assert bytes(await peer.read(rkey, addr, 128 * PAGE)) == fresh
        await puppet.munmap(addr + 128 * PAGE, 64 * PAGE)
        for op in (
            peer.read(rkey, addr + 100 * PAGE, 64 * PAGE),
            peer.write(rkey, addr + 100 * PAGE, bytes(64 * PAGE)),
        ):
            with pytest.raises(DeviceError) as info:
                await op
            assert info.value.errno == errno.EFAULT
        # The agent is healthy after the failures, and its slots came back.
        assert bytes(await peer.read(rkey, addr + 192 * PAGE, 64 * PAGE)) == data[192 * PAGE :]
        after = await figures(hmmd)
    assert delta(after, before, "window_reads") >= 4


async def test_window_off_takes_the_plain_path(hmmd, puppet):
    size = 512 * 1024
    addr = await puppet.mmap(size)
    data = os.urandom(size)
    await puppet.write(addr, data)
    before = await figures(hmmd)
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{size}:rw", extra=["--dma-window", "off"]) as a,
        a.peer() as peer,
    ):
        (rkey,) = a.rkeys
        assert bytes(await peer.read(rkey, addr, size)) == data
        new = os.urandom(size - 5)
        await peer.write(rkey, addr + 5, new)
        assert await puppet.read(addr + 5, size - 5) == new
        during = await figures(hmmd)
    assert during["windows"] == before["windows"]
    assert delta(during, before, "window_reads") == delta(during, before, "window_writes") == 0
    assert delta(during, before, "dma_reads") >= 1 and delta(during, before, "dma_writes") >= 1


async def test_a_full_window_falls_back_to_the_plain_path(hmmd, puppet):
    size = 1 << 20
    addr = await puppet.mmap(size)
    data = os.urandom(size)
    await puppet.write(addr, data)
    before = await figures(hmmd)
    # 128 KiB: one 100 KiB access at a time fits; the others in flight find no slot.
    async with (
        hm_agent(hmmd, f"{puppet.pid}:{addr:#x}:{size}:rw", extra=["--dma-window", "128K"]) as a,
        a.peer() as peer,
    ):
        (rkey,) = a.rkeys
        await peer.read(rkey, addr, size)  # every page translated: the rest is DMA only
        for _ in range(3):
            reads = [peer.read(rkey, addr + i * 100_000, 100_000) for i in range(10)]
            for i, got in enumerate(await asyncio.gather(*reads)):
                assert bytes(got) == data[i * 100_000 : (i + 1) * 100_000], i
        writes = [os.urandom(100_000) for _ in range(10)]
        await asyncio.gather(
            *(peer.write(rkey, addr + i * 100_000, w) for i, w in enumerate(writes))
        )
        for i, w in enumerate(writes):
            assert await puppet.read(addr + i * 100_000, 100_000) == w
        during = await figures(hmmd)
    window = delta(during, before, "window_reads")
    assert window >= 1, "some reads found a slot"
    assert delta(during, before, "dma_reads") > window, "the others took the plain path"
    assert 1 <= delta(during, before, "window_writes") < delta(during, before, "dma_writes")


def as_version(frames: list[Any], version: tuple[int, int]) -> list[Any]:
    """``frames`` with the header's ``v`` replaced: a message of an older agent."""
    header = msgpack.unpackb(bytes(frames[1]), raw=False)
    header["v"] = list(version)
    return [frames[0], msgpack.packb(header), *frames[2:]]


async def old_request(peer: RawPeer, msg: Message, bulk: list[Any] | None = None) -> Any:
    """Send ``msg`` as a 1.0 agent would (header ``v`` [1, 0]); its reply."""
    peer.next_id += 1
    msg_id = peer.next_id
    peer.replies[msg_id] = asyncio.get_running_loop().create_future()
    peer.sock.send_multipart(as_version(encode(msg, msg_id, bulk=bulk or []), (1, 0)))
    return await peer.reply(msg_id)


async def test_a_protocol_1_0_agent_works_unchanged_and_gets_no_window(hmmd, puppet):
    addr = await puppet.mmap(16 * PAGE)
    data = os.urandom(16 * PAGE)
    await puppet.write(addr, data)
    async with raw_peer(hmmd.endpoint) as peer:
        welcome = (await old_request(peer, Hello(agent="one-oh"))).msg
        assert isinstance(welcome, Welcome) and welcome.window_max == 0
        reg = (
            await old_request(
                peer,
                Register(
                    pid=puppet.pid,
                    start_time=0,
                    intervals=((addr, addr + 16 * PAGE),),
                    access=int(Access.READ),
                ),
            )
        ).msg
        assert isinstance(reg, Registered)
        entries = await peer.populate(reg.mirror, addr, 16)
        env = await old_request(peer, DmaRead(mirror=reg.mirror, start=addr, npages=16), [entries])
        assert isinstance(env.msg, DmaReadReply) and bytes(env.bulk[0]) == data
        bad = (await peer.stats())["bad_messages"]
        env = await old_request(peer, WindowOpen(size=16 * PAGE))
        assert isinstance(env.msg, Error) and env.msg.code == ErrorCode.UNKNOWN_MESSAGE
        assert "1.1" in env.msg.message
        assert (await peer.stats())["bad_messages"] == bad + 1, "a type a 1.0 session lacks"


def test_dma_window_setting_layers_and_bounds(tmp_path):
    """``dma_window`` comes from the file, HMMIRROR_AGENT_DMA_WINDOW or ``--dma-window``;
    off or 0 for none; a size in no layer may be other than whole pages up to 64 MiB (one
    line, exit 2)."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text('listen = "ipc:///tmp/x.sock"\ndma_window = "16MiB"\n')

    def check(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HM_AGENT, "--config", str(cfg), *flags, "check-config"],
            capture_output=True, text=True, timeout=DEADLINE, env={**os.environ, **(env or {})},
        )  # fmt: skip

    assert check().returncode == 0
    for flags, env in (
        (("--dma-window", "off"), None),
        (("--dma-window", "0"), None),
        ((), {"HMMIRROR_AGENT_DMA_WINDOW": "64MiB"}),
        (("--dma-window", "4096"), {"HMMIRROR_AGENT_DMA_WINDOW": "off"}),
    ):
        out = check(*flags, env=env)
        assert (out.returncode, out.stdout) == (0, "configuration OK\n"), (flags, out.stderr)
    for flags, env in (
        (("--dma-window", "65MiB"), None),
        (("--dma-window", "5000"), None),
        ((), {"HMMIRROR_AGENT_DMA_WINDOW": "lots"}),
        (("--dma-window", "4096"), {"HMMIRROR_AGENT_DMA_WINDOW": "65MiB"}),
    ):
        out = check(*flags, env=env)
        assert out.returncode == 2 and "dma" in out.stderr.lower(), (flags, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr


async def test_the_window_is_attached_again_after_a_new_hello(hmmd, puppet):
    addr = await puppet.mmap(64 * PAGE)
    async with connect(hmmd.endpoint, name="rehello") as session:
        assert await session.use_window(1 << 20)
        first = session.dma_window
        assert first is not None
        await session.rehello()  # a new session: hmmd unmapped the old one's window
        async with asyncio.timeout(5):
            while session.dma_window is None:
                await asyncio.sleep(0.01)
        assert session.dma_window is first, "the same memfd, handed to the new session"
        stats = await session.status()
        assert (stats["windows"], stats["windows_attached"]) == (1, 2)
        mirror = await session.mirror(puppet.pid, addr, 64 * PAGE, Access.READ | Access.WRITE)
        data = os.urandom(64 * PAGE)
        await mirror.write(addr, data)
        assert await puppet.read(addr, 64 * PAGE) == data
        assert (await session.status())["window_writes"] == 1
    assert (await figures(hmmd))["windows"] == 0


async def test_a_slot_whose_request_got_no_answer_is_never_reused(hmmd, puppet):
    """A window DMA cancelled in flight (or timed out, or answered EBUSY) may still be
    copied by hmmd later: its slot is quarantined for the window's life, never lent again."""
    addr = await puppet.mmap(64 * PAGE)
    data = os.urandom(64 * PAGE)
    await puppet.write(addr, data)
    async with connect(hmmd.endpoint, name="quarantine") as session:
        assert await session.use_window(64 * PAGE)
        window = session.dma_window
        assert window is not None
        mirror = await session.mirror(puppet.pid, addr, 64 * PAGE, Access.READ)
        assert (await mirror.read(addr, 64)).data == data  # every page translated
        hold: list[Any] = []
        fault = mirror._dmirror_fault(False)
        task = asyncio.ensure_future(mirror.transfer(addr, 32 * PAGE, None, fault, hold))
        await asyncio.sleep(0)  # sent; its answer not read yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert window.quarantined == 32 and not hold
        # The other half is still lent and given back; the quarantined half never again.
        pieces, _ = await mirror.transfer(addr + 32 * PAGE, 32 * PAGE, None, fault, hold)
        assert bytes(pieces[0]) == data[32 * PAGE :] and len(hold) == 1
        assert hold[0].offset == 32 * PAGE
        window.give_back(hold.pop())
        for _ in range(3):
            slot = window.take(32 * PAGE)
            assert slot is not None and slot.offset == 32 * PAGE
            window.give_back(slot)
        assert window.take(33 * PAGE) is None
