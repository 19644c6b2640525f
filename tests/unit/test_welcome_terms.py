"""A WELCOME whose terms no session can keep is refused, not obeyed.

The client took hmmd's heartbeat, lease and page limits as given: a lease of 0 made the
session lost at once, and it knocked again and again without pause; a lease of 49 days
left a silent daemon unnoticed; a page limit of 0 failed every fault. The daemon here is a
real ``transport.Server`` on an ipc:// endpoint, answering HELLO with the terms under test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hmmirror.client import DaemonUnavailable, connect
from hmmirror.proto import decode, encode
from hmmirror.proto import messages as M
from hmmirror.transport import Server

GOOD = {
    "session": 1, "epoch": "0123456789abcdef", "heartbeat_ms": 200, "lease_ms": 600,
    "ack_deadline_ms": 1000, "zero_pfn": 0, "max_fault_pages": 512, "max_dma_pages": 1024,
}  # fmt: skip


@pytest.mark.parametrize(
    "terms",
    [
        {"lease_ms": 0},
        {"heartbeat_ms": 0},
        {"lease_ms": 2**32 - 1},
        {"max_dma_pages": 0},
        {"lease_ms": 100},
    ],
    ids=["lease 0", "heartbeat 0", "lease 49 days", "no DMA pages", "lease under heartbeat"],
)
async def test_a_welcome_no_session_can_keep_is_refused(tmp_path: Any, terms: dict[str, int]):
    hellos = 0
    server: Server

    def answer(conn: Any, frames: Any) -> None:
        nonlocal hellos
        env = decode(list(frames))
        if isinstance(env.msg, M.Hello):
            hellos += 1
            server.send(conn.rid, encode(M.Welcome(**{**GOOD, **terms}), 1, env.id))

    server = Server(f"ipc://{tmp_path}/fake.sock", answer)
    server.start()
    try:
        with pytest.raises(DaemonUnavailable, match="unusable terms") as refused:
            async with connect(server.endpoint, timeout=5.0):
                pass
        await asyncio.sleep(0.3)  # no second knock follows
        assert hellos == 1, f"{hellos} HELLOs"
        print(f"\n{refused.value}")
    finally:
        server.close()


async def test_the_terms_hmmd_offers_by_default_are_kept(tmp_path: Any):
    assert M.Welcome(**GOOD).unusable() is None
