"""Attacks on the shared-memory DMA window (SPEC §4.9): tickets, descriptors, sizes, offsets.

hmmd maps what a peer hands its door, so each of its checks has a test here that
fails without it: a raw session (``hmmirror.testing.rawpeer``) asks for tickets,
raw Unix connections to hmmd's door present them with hand-made descriptors,
and a real second user (``make_user``, setpriv) presents a ticket that is not
its own. Every refusal must be one line at the door, counted in
``window_refusals``, with no window mapped and hmmd serving on.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import mmap
import os
import socket
import subprocess
import sys
from typing import Any

import pytest
from hmmirror.proto import ErrorCode
from hmmirror.proto.messages import (
    MAX_WINDOW,
    DmaReadInto,
    DmaWriteFrom,
    Error,
    Ok,
    WindowOpen,
    WindowTicket,
)
from hmmirror.testing.hmmd import HmmdStartError, start_hmmd
from hmmirror.testing.rawpeer import RawPeer, raw_peer
from hmmirror.transport.door import read_reply

PAGE = 4096
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def door_of(endpoint: str) -> str:
    """The Unix socket of an ipc:// hmmd."""
    return endpoint[len("ipc://") :]


def memfd(size: int, seals: int = SEALS) -> int:
    """A memfd of ``size`` bytes with ``seals``."""
    fd = os.memfd_create("attack", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def knock(path: str, line: str, fd: int) -> str:
    """Hand ``fd`` to the door at ``path`` with ``line``; hmmd's one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        socket.send_fds(sock, [line.encode() + b"\n"], [fd])
        return read_reply(sock).strip()


async def ticket(peer: RawPeer, size: int) -> str:
    """A window ticket for ``peer``'s session."""
    env = await peer.request(WindowOpen(size=size))
    assert isinstance(env.msg, WindowTicket), env.msg
    return env.msg.ticket


async def refused(peer: RawPeer, endpoint: str, line: str, fd: int, why: str) -> None:
    """The door refuses ``line`` with ``fd`` saying ``why``; counted, and no window mapped."""
    before = await peer.stats()
    answer = knock(door_of(endpoint), line, fd)
    assert answer.startswith("error ") and why in answer, answer
    after = await peer.stats()
    assert after["window_refusals"] == before["window_refusals"] + 1
    assert after["windows"] == before["windows"] == 0


async def test_wrong_malformed_and_reused_tickets_are_refused(hmmd):
    async with raw_peer(hmmd.endpoint) as peer:
        await peer.hello()
        fd = memfd(16 * PAGE)
        try:
            await refused(
                peer, hmmd.endpoint, "window " + "ab" * 16, fd, "unknown, expired or used"
            )
            await refused(peer, hmmd.endpoint, "window zz", fd, "32 lowercase hex digits")
            await refused(peer, hmmd.endpoint, "window", fd, "32 lowercase hex digits")
            good = await ticket(peer, 16 * PAGE)
            await refused(peer, hmmd.endpoint, f"window {good.upper()}", fd, "lowercase hex")
            # A ticket is used up by the first line that names it, even one refused later.
            pipe_r, pipe_w = os.pipe()
            try:
                await refused(peer, hmmd.endpoint, f"window {good}", pipe_r, "not a memfd")
            finally:
                os.close(pipe_r)
                os.close(pipe_w)
            await refused(peer, hmmd.endpoint, f"window {good}", fd, "unknown, expired or used")
            # And a ticket that worked works once.
            good = await ticket(peer, 16 * PAGE)
            assert knock(door_of(hmmd.endpoint), f"window {good}", fd) == "ok"
            assert (await peer.stats())["windows"] == 1
            answer = knock(door_of(hmmd.endpoint), f"window {good}", fd)
            assert "unknown, expired or used" in answer, answer
            # One window per session: a second window_open is EBUSY.
            env = await peer.request(WindowOpen(size=16 * PAGE))
            assert isinstance(env.msg, Error) and env.msg.code == ErrorCode.EBUSY
        finally:
            os.close(fd)


async def test_an_expired_ticket_is_refused(hmmd):
    async with raw_peer(hmmd.endpoint) as peer:
        await peer.hello(heartbeat=True)
        env = await peer.request(WindowOpen(size=16 * PAGE))
        assert isinstance(env.msg, WindowTicket) and 0 < env.msg.expires_ms <= 10_000
        await asyncio.sleep(env.msg.expires_ms / 1000 + 0.2)  # heartbeats keep the session
        fd = memfd(16 * PAGE)
        try:
            await refused(
                peer, hmmd.endpoint, f"window {env.msg.ticket}", fd, "unknown, expired or used"
            )
        finally:
            os.close(fd)


@pytest.mark.parametrize(
    "kind", ["regular file", "pipe", "unsealed memfd", "memfd without F_SEAL_SEAL",
             "memfd without F_SEAL_GROW", "memfd of another size", "read-only memfd"],
)  # fmt: skip
async def test_only_a_sealed_memfd_of_the_ticket_size_is_taken(hmmd, tmp_path, kind):
    size = 16 * PAGE
    fds: list[int] = []
    if kind == "regular file":
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        fds, why = [fd], "not a memfd"
    elif kind == "pipe":
        fds, why = list(os.pipe()), "not a memfd"
    elif kind == "unsealed memfd":
        fds, why = [memfd(size, 0)], "must be sealed"
    elif kind == "memfd without F_SEAL_SEAL":
        fds, why = [memfd(size, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)], "must be sealed"
    elif kind == "memfd without F_SEAL_GROW":
        fds, why = [memfd(size, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)], "must be sealed"
    elif kind == "memfd of another size":
        fds, why = [memfd(2 * size)], "the ticket was for"
    else:
        sealed = memfd(size)
        fds, why = [sealed, os.open(f"/proc/self/fd/{sealed}", os.O_RDONLY)], "cannot map"
    try:
        async with raw_peer(hmmd.endpoint) as peer:
            await peer.hello()
            await refused(peer, hmmd.endpoint, f"window {await ticket(peer, size)}", fds[-1], why)
            # hmmd serves on, and the same session may still attach a proper window.
            good = memfd(size)
            fds.append(good)
            assert knock(door_of(hmmd.endpoint), f"window {await ticket(peer, size)}", good) == "ok"
    finally:
        for fd in fds:
            os.close(fd)


async def test_window_sizes_are_bounded(hmmd):
    async with raw_peer(hmmd.endpoint) as peer:
        welcome = await peer.hello()
        assert welcome.window_max == MAX_WINDOW == 64 << 20
        for size, code in (
            (0, ErrorCode.EINVAL),
            (PAGE + 1, ErrorCode.EINVAL),
            (MAX_WINDOW + PAGE, ErrorCode.TOO_LARGE),
        ):
            env = await peer.request(WindowOpen(size=size))
            assert isinstance(env.msg, Error) and env.msg.code == code, (size, env.msg)
        assert (await peer.stats())["windows"] == 0


async def attached(peer: RawPeer, endpoint: str, size: int) -> mmap.mmap:
    """Attach a window of ``size`` bytes to ``peer``'s session; the test's own mapping of it."""
    fd = memfd(size)
    try:
        assert knock(door_of(endpoint), f"window {await ticket(peer, size)}", fd) == "ok"
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


async def test_offsets_outside_the_window_are_einval(hmmd, puppet):
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, b"target!!" * (4 * PAGE // 8))
    async with raw_peer(hmmd.endpoint) as peer:
        await peer.hello()
        mirror = await peer.register(puppet.pid, addr, addr + 4 * PAGE)
        entries = await peer.populate(mirror, addr, 2, write=True)

        async def ask(msg: Any) -> Any:
            return (await peer.request(msg, [entries[: msg.npages * 8]])).msg

        # No window yet: EINVAL, not a crash.
        reply = await ask(DmaReadInto(mirror=mirror, start=addr, npages=2, offset=0))
        assert isinstance(reply, Error) and reply.code == ErrorCode.EINVAL, reply
        window = await attached(peer, hmmd.endpoint, 16 * PAGE)
        before = await peer.stats()
        for msg in (
            DmaReadInto(mirror=mirror, start=addr, npages=2, offset=15 * PAGE),  # 1 page over
            DmaReadInto(mirror=mirror, start=addr, npages=2, offset=MAX_WINDOW),
            DmaReadInto(mirror=mirror, start=addr, npages=2, offset=100),  # unaligned
            DmaWriteFrom(mirror=mirror, start=addr, npages=2, offset=15 * PAGE + 1, length=PAGE),
            DmaWriteFrom(mirror=mirror, start=addr, npages=1, offset=16 * PAGE - 8, length=16),
            DmaWriteFrom(mirror=mirror, start=addr, npages=2, offset=MAX_WINDOW, length=PAGE + 1),
        ):
            reply = await ask(msg)
            assert isinstance(reply, Error) and reply.code == ErrorCode.EINVAL, (msg, reply)
        after = await peer.stats()
        assert after["bad_messages"] == before["bad_messages"] + 6
        assert after["window_reads"] == before["window_reads"]
        assert bytes(window[: 16 * PAGE]) == bytes(16 * PAGE), "nothing was copied"
        # Inside the window it works, both ways, at the right bytes.
        reply = await ask(DmaReadInto(mirror=mirror, start=addr, npages=2, offset=14 * PAGE))
        assert isinstance(reply, Ok), reply
        assert window[14 * PAGE : 16 * PAGE] == b"target!!" * (2 * PAGE // 8)
        window[5 : 5 + 11] = b"from window"
        reply = await ask(DmaWriteFrom(mirror=mirror, start=addr, npages=1, offset=5, length=11))
        assert isinstance(reply, Ok), reply
        # Exactly the 11 bytes landed, at byte 5 of the page (offset % 4096).
        assert await puppet.read(addr, 24) == b"targefrom window" + b"target!!"
        window.close()


async def test_another_process_cannot_present_a_sessions_ticket(hmmd):
    code = (
        "import os, socket, sys, fcntl\n"
        "fd = os.memfd_create('x', os.MFD_ALLOW_SEALING)\n"
        "os.ftruncate(fd, 16 * 4096)\n"
        "fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW"
        " | fcntl.F_SEAL_SEAL)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "socket.send_fds(s, [sys.argv[2].encode() + b'\\n'], [fd])\n"
        "print(s.recv(256).decode().strip())\n"
    )
    async with raw_peer(hmmd.endpoint) as peer:
        await peer.hello()
        line = f"window {await ticket(peer, 16 * PAGE)}"
        # The same user, another process (a child): not the session's process.
        out = subprocess.run(
            [sys.executable, "-c", code, door_of(hmmd.endpoint), line],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "belongs to another process" in out.stdout, (out.stdout, out.stderr)
        stats = await peer.stats()
        assert stats["windows"] == 0 and stats["window_refusals"] == 1
        assert stats["sessions"] == 1, "the session itself lives on"


async def test_another_user_cannot_present_a_sessions_ticket(hmmd, hmmd_group, make_user):
    code = (
        "import os, socket, sys, fcntl\n"
        "fd = os.memfd_create('x', os.MFD_ALLOW_SEALING)\n"
        "os.ftruncate(fd, 16 * 4096)\n"
        "fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW"
        " | fcntl.F_SEAL_SEAL)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "socket.send_fds(s, [sys.argv[2].encode() + b'\\n'], [fd])\n"
        "print(s.recv(256).decode().strip())\n"
    )
    mallory = make_user(groups=(hmmd_group,))
    async with raw_peer(hmmd.endpoint) as peer:
        await peer.hello()
        line = f"window {await ticket(peer, 16 * PAGE)}"
        out = mallory.run(mallory.python(code, door_of(hmmd.endpoint), line))
        assert "belongs to another process" in out.stdout, (out.stdout, out.stderr)
        stats = await peer.stats()
        assert stats["windows"] == 0 and stats["window_refusals"] == 1
        # The ticket was used up by the attempt: the owner must ask again.
        fd = memfd(16 * PAGE)
        try:
            answer = knock(door_of(hmmd.endpoint), line, fd)
            assert "unknown, expired or used" in answer, answer
        finally:
            os.close(fd)


async def test_a_tcp_session_never_gets_a_window(tmp_path):
    env = dict(os.environ, HMMIRROR_EXPOSE_SOCKET=str(tmp_path / "uffd.sock"))
    try:
        proc = start_hmmd(
            "tcp://127.0.0.1:0", ["--insecure"], log_path=str(tmp_path / "hmmd.log"), env=env
        )
    except HmmdStartError as e:
        raise AssertionError(str(e)) from None
    try:
        async with raw_peer(proc.endpoint) as peer:
            welcome = await peer.hello()
            assert welcome.window_max == 0
            env_reply = await peer.request(WindowOpen(size=16 * PAGE))
            msg = env_reply.msg
            assert isinstance(msg, Error) and msg.code == ErrorCode.PERMISSION_DENIED, msg
            stats = await peer.stats()
            assert stats["windows"] == 0 and stats["refusals"] >= 1
        # Its only Unix socket, the uffd intake, knows no 'window' line.
        fd = memfd(16 * PAGE)
        try:
            answer = knock(str(tmp_path / "uffd.sock"), "window " + "ab" * 16, fd)
        finally:
            os.close(fd)
        assert answer.startswith("error ") and "'uffd'" in answer, answer
    finally:
        rc, _ = proc.stop(10)
    assert rc == 0, proc.log()


def test_window_refusals_are_counted_in_json_status(hmmd):
    # hmmctl shows the window figures to anyone: they are counters, naming nobody.
    out = subprocess.run(
        [sys.executable, "-m", "hmmirror.tools.ctlapp", "--endpoint", hmmd.endpoint,
         "status", "-j"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    stats = json.loads(out.stdout)
    for key in ("windows", "window_bytes", "windows_attached", "window_refusals"):
        assert stats[key] == 0, key
