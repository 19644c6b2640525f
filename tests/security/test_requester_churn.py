"""Requesters that come and go leave nothing behind in hm-agent's RDMA service.

Every reply the service sends is counted against its requester (``ReplyBudget``, the
per-requester reply cap). Before, a requester's count was forgotten only by a sweep that ran
every 1024th READ or ``stat_mr`` that reached the budget check, and ``goodbye`` forgot
nothing: a requester that connects, is refused (no grant) or says ``goodbye``, and goes
away left its record for good, about 0.7 KB each, so one local user could grow hm-agent by
hundreds of MB an hour (found by attacking it as another user). Now ``goodbye`` forgets
its requester, and the sweep runs every 1024th message of any kind, garbage included.

The service is the real one, on a real session with a real hmmd; the requesters are raw
ZeroMQ peers dialled through the real door, each on a connection of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import zmq
from hmmirror.client.mlx5 import Nic
from hmmirror.client.mlx5.service import SWEEP_EVERY, RdmaService
from hmmirror.proto import decode, encode
from hmmirror.proto import messages as M
from hmmirror.transport import dial

#: Requesters that come and go in each phase.
COMERS = 60


def come_and_go(endpoint: str, requests: list[M.Message], comers: int) -> list[str]:
    """``comers`` connections in turn, each sending ``requests`` (reading every answer)
    and closing; the answers' types."""
    ctx: zmq.Context[Any] = zmq.Context()
    answers: list[str] = []
    try:
        for _ in range(comers):
            sock = dial(ctx, endpoint, None, timeout=5.0)
            try:
                for i, msg in enumerate(requests, 1):
                    sock.send_multipart(encode(msg, i))
                    assert sock.poll(5000), f"no answer to {msg.TYPE}"
                    answers.append(decode(sock.recv_multipart()).type)
            finally:
                sock.close(linger=0)
    finally:
        ctx.term()
    return answers


def come_and_go_raw(endpoint: str, comers: int, each: int = 1) -> int:
    """``comers`` connections in turn, each sending ``each`` frames of garbage (reading every
    answer) and closing; how many were answered."""
    ctx: zmq.Context[Any] = zmq.Context()
    answered = 0
    try:
        for _ in range(comers):
            sock = dial(ctx, endpoint, None, timeout=5.0)
            try:
                for _ in range(each):
                    sock.send(b"\xc1 not msgpack")
                    answered += bool(sock.poll(5000)) and bool(sock.recv_multipart())
            finally:
                sock.close(linger=0)
    finally:
        ctx.term()
    return answered


async def test_requesters_that_come_and_go_leave_no_record_behind(hmmd, agent, tmp_path):
    async with agent() as session:
        service = RdmaService(Nic(session, "mlx5_churn"), f"ipc://{tmp_path}/rdma.sock")
        service.start()
        try:
            endpoint = service.endpoint
            # Saying goodbye: each requester's record goes with it.
            answers = await asyncio.to_thread(come_and_go, endpoint, [M.Goodbye()], COMERS)
            assert answers == ["ok"] * COMERS
            assert len(service.budget.peers) <= 1, len(service.budget.peers)
            # Refused (no grant: an unknown rkey), then gone without a word: the records stay
            # until the next sweep, which comes within SWEEP_EVERY requests of any kind.
            refused = [M.RdmaRead(rkey=0x1234, addr=0x1000, length=8)]
            answers = await asyncio.to_thread(come_and_go, endpoint, refused, COMERS)
            assert answers == ["error"] * COMERS
            assert len(service.budget.peers) >= COMERS // 2, "the records were counted"
            answers = await asyncio.to_thread(come_and_go, endpoint, refused * SWEEP_EVERY, 1)
            assert answers == ["error"] * SWEEP_EVERY
            assert len(service.budget.peers) <= 2, len(service.budget.peers)
            # Garbage, not even a request: its answers are counted, and swept as well.
            answered = await asyncio.to_thread(come_and_go_raw, endpoint, COMERS)
            assert answered == COMERS
            assert len(service.budget.peers) >= COMERS // 2, "the records were counted"
            answered = await asyncio.to_thread(come_and_go_raw, endpoint, 1, SWEEP_EVERY)
            assert answered == SWEEP_EVERY
            assert len(service.budget.peers) <= 2, len(service.budget.peers)
        finally:
            await service.close()
