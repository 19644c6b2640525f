"""Copies on the targets' workers: what running them off the event loop must not change.

Atomics through one hmmd on one target stay atomic with respect to each other,
and device writes queued for one target into pages a strict mirror holds all
land at once: none waits for hmmd's own strict-write fault, whose ACK the
writing agent holds while its writes are in flight.
"""

from __future__ import annotations

import asyncio
import struct
import time

from hmmirror.client import Access
from hmmirror.proto.messages import AtomicOp

PAGE = 4096
#: Bytes of reads queued between two writes: long enough for the first write's completion to
#: reach hmmd's loop before the second write's copy starts.
BULK = 16 << 20


async def test_concurrent_atomics_on_one_target_never_interleave(hmmd, puppet, agent):
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, bytes(PAGE))
    per_agent, agents = 150, 4

    async def adder(name: str) -> list[int]:
        async with agent(name=name) as s:
            mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ | Access.WRITE)
            fault = lambda a, n: mirror.fault(a, n, True)  # noqa: E731
            olds = await asyncio.gather(
                *(mirror.atomic(addr, AtomicOp.FETCH_ADD, 1, 0, fault) for _ in range(per_agent))
            )
            await mirror.close()
            return list(olds)

    olds = [
        old for got in await asyncio.gather(*(adder(f"a{i}") for i in range(agents))) for old in got
    ]
    total = per_agent * agents
    # Each fetch_add saw a distinct old value: no two read the same cell before either wrote.
    assert sorted(olds) == list(range(total))
    assert struct.unpack("<Q", await puppet.read(addr, 8))[0] == total


async def test_queued_device_writes_into_strict_pages_do_not_wait(hmmd, puppet, agent):
    await puppet.expose(hmmd.endpoint)
    await puppet.expose(hmmd.endpoint, strict=True)
    addr = await puppet.mmap(2 * PAGE)
    await puppet.write(addr, b"old!" * (2 * PAGE // 4))
    bulk = await puppet.mmap(BULK)
    for off in range(0, BULK, 1 << 20):
        await puppet.write(bulk + off, b"b" * (1 << 20))
    async with agent(name="strict-writer") as s:
        mirror = await s.mirror(
            puppet.pid, addr, 2 * PAGE, Access.READ | Access.WRITE, strict_writes=True
        )
        reader = await s.mirror(puppet.pid, bulk, BULK, Access.READ)
        await mirror.fault(addr, 2, write=True)
        await reader.fault(bulk, BULK // PAGE)
        for round_ in range(3):
            t0 = time.monotonic()
            # In this order on the target's worker: a write, ~16 MiB of reads (the write's
            # completion reaches the loop meanwhile), then a second write to the same page.
            await asyncio.gather(
                mirror.write(addr, bytes([65 + round_]) * PAGE),
                *(reader.read(bulk + i * (4 << 20), 1024) for i in range(BULK >> 22)),
                mirror.write(addr, bytes([97 + round_]) * PAGE),
            )
            took = time.monotonic() - t0
            # hmmd's copy deadline is 1 s: a write that waited for hmmd's own strict fault
            # would have been answered EBUSY after it; these copies take milliseconds.
            assert took < 0.9, f"round {round_}: the queued copies took {took:.2f} s"
            assert await puppet.read(addr, 1) == bytes([97 + round_])  # in order
        st = await s.status()
        assert st["evictions"] == 0 and st["copy_timeouts"] == 0, st
        # The strict protection is back: the target's own write waits for the mirror's ack.
        assert st["strict_write_faults"] == 0
        await mirror.fault(addr, 1)
        await asyncio.wait_for(puppet.write(addr, b"z"), 5)
        assert (await s.status())["strict_write_faults"] >= 1
