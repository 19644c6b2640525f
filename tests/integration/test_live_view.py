"""The pictures an operator looks at, on a real terminal: ``hmmctl top`` full screen and
``hmmctl status``'s ack histogram against a live hmmd, and the progress bars of ``hmmctl
check`` and the demo, each run on a pseudo-terminal (``os.openpty``) as a person would,
and again where its output is a pipe or ``-j``, which must stay as programs read it."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import termios
import time

from hmmirror.client import Access

HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]
PAGE = 4096
SMCUP, RMCUP = b"\x1b[?1049h", b"\x1b[?1049l"  # xterm's alternate screen, in and out


class Terminal:
    """A child whose stdin and stdout (and stderr, unless piped) are a pseudo-terminal
    of 100 x 40 with ``TERM=xterm``; what it draws is read from the master side."""

    def __init__(self, argv: list[str], *, stderr_pipe: bool = False, stdout_pipe: bool = False,
                 term: str = "xterm") -> None:  # fmt: skip
        self.master, self.slave = os.openpty()
        size = bytes([40, 0, 100, 0, 0, 0, 0, 0])  # struct winsize: 40 rows, 100 columns
        import fcntl

        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, size)
        self.proc = subprocess.Popen(
            argv, stdin=self.slave,
            stdout=subprocess.PIPE if stdout_pipe else self.slave,
            stderr=subprocess.PIPE if stderr_pipe else self.slave,
            env={**os.environ, "TERM": term, "COLUMNS": "100", "LINES": "40"},
        )  # fmt: skip
        self.seen = b""

    def read_until(self, needle: bytes, limit: float, times: int = 1) -> bytes:
        """What the child drew until ``needle`` appears ``times`` times (AssertionError
        after ``limit`` s)."""
        deadline = time.monotonic() + limit
        while self.seen.count(needle) < times:
            left = deadline - time.monotonic()
            assert left > 0, f"no {needle!r} in {limit} s; drawn: {self.seen[-3000:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: nothing holds the terminal open any more
                    break
        return self.seen

    def finish(self, limit: float) -> tuple[int, bytes, bytes, bytes]:
        """Wait for the child; its status, what it drew, and its piped stdout and stderr."""
        out, err = self.proc.communicate(timeout=limit)
        while True:  # what is left on the terminal
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                break
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        return self.proc.returncode, self.seen, out or b"", err or b""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self.master)
        os.close(self.slave)


async def _invalidations(s, puppet, n: int = 30):  # type: ignore[no-untyped-def]
    """A mirror on the puppet and ``n`` acked invalidations of it."""
    addr = await puppet.mmap(PAGE)
    mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
    for _ in range(n):
        await mirror.fault(addr, 1)
        await s.sync_range(puppet.pid, addr, addr + PAGE)
    return mirror


def _hmmctl(endpoint: str, *args: str) -> str:
    out = subprocess.run([*HMMCTL, "--endpoint", endpoint, *args], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_status_draws_the_ack_round_trip_histogram_and_gives_it_parsed(hmmd, puppet, agent):
    async with agent(name="hist-agent") as s:
        await _invalidations(s, puppet)
        text = await asyncio.to_thread(_hmmctl, hmmd.endpoint, "status")
        data = json.loads(await asyncio.to_thread(_hmmctl, hmmd.endpoint, "status", "-j"))
    hist = data["ack_histogram"]
    assert [set(b) for b in hist] == [{"le_s", "count"}] * len(hist) and hist, data
    bounds = [b["le_s"] for b in hist if b["le_s"] is not None]
    assert bounds == sorted(bounds) and all(b["count"] > 0 for b in hist)
    # every round trip since the start, in the buckets (the ring has not wrapped)
    assert sum(b["count"] for b in hist) == data["ack_samples"] >= 30
    lines = text.splitlines()
    assert not any(line.startswith("ack_histogram") for line in lines)
    at = lines.index(f"ack round trip since hmmd started ({data['ack_samples']} round trips):")
    bars = lines[at + 1 :]
    assert bars and all(line.startswith(("  <=", "  > ")) for line in bars), text
    assert sum(int(line.split()[-1]) for line in bars) == data["ack_samples"]


async def test_top_is_a_full_screen_table_on_a_terminal_and_q_quits(hmmd, puppet, agent):
    async with agent(name="screen-agent") as s:
        await _invalidations(s, puppet)
        term = Terminal([*HMMCTL, "--endpoint", hmmd.endpoint, "top", "--interval", "200ms"])
        try:
            # the second reading has rates, and an interval's histogram or the whole one
            await asyncio.to_thread(term.read_until, b"per second  invalidations 0", 20)
            before = termios.tcgetattr(term.slave)[3] & termios.ICANON
            await asyncio.to_thread(os.write, term.master, b"q")
            rc, drawn, _, _ = await asyncio.to_thread(term.finish, 10)
            after = termios.tcgetattr(term.slave)[3] & termios.ICANON
        finally:
            term.close()
    assert rc == 0, drawn[-2000:]
    # the alternate screen first, and left last (xterm's rmcup then pops its title stack)
    assert drawn.startswith(SMCUP) and RMCUP in drawn[-30:], drawn[-200:]
    assert not before and after, "cbreak while it ran (q without Enter), the terminal restored"
    assert b"hmmctl top  " + hmmd.endpoint.encode() in drawn
    assert b"sessions 1  mms 1  mirrors 1  in flight 0  evictions 0" in drawn
    assert b"ack round trip  p50 " in drawn and b"since hmmd started: " in drawn
    assert "\u2588".encode() in drawn  # the histogram's bars, drawn in blocks
    assert b"screen-agent" in drawn and str(puppet.pid).encode() in drawn
    assert drawn.count(b"\x1b[H") >= 2, "redrawn in place, not scrolled"
    assert b"TIME  SESS" not in drawn


def test_top_keeps_its_lines_with_count_or_on_a_dumb_terminal(hmmd):
    for extra, term in ((["--count", "2"], "xterm"), ([], "dumb")):
        argv = [*HMMCTL, "--endpoint", hmmd.endpoint, "top", "--interval", "100ms", *extra]
        t = Terminal(argv, term=term)
        try:
            drawn = t.read_until(b"\r\n", 10, times=1 if extra else 3)
            if not extra:
                t.proc.terminate()
            t.finish(10)
        finally:
            t.close()
        assert SMCUP not in t.seen and t.seen.startswith(b"TIME  SESS  MMS  MIRRORS"), drawn


def test_check_draws_its_bar_on_a_terminal_and_never_on_a_pipe_or_under_json():
    argv = [*HMMCTL, "check", "--seed", "5", "--duration", "2", "--ops", "400", "--agents", "1"]
    term = Terminal(argv, stdout_pipe=True)  # stderr on the terminal, the report piped
    try:
        rc, drawn, out, _ = term.finish(120)
    finally:
        term.close()
    assert rc == 0, out.decode()[-2000:]
    text = drawn.decode()
    assert "\r\x1b[Kcheck  [" in text and "ops, " in text and "s left" in text, text[-800:]
    assert "judging every READ" in text and text.endswith("\r\x1b[K"), "erased at the end"
    assert b"\x1b[" not in out and b"hmmirror coherence check" in out
    piped = subprocess.run([*argv, "--seed", "6"], capture_output=True, timeout=120)
    assert piped.returncode == 0 and b"\x1b[" not in piped.stdout + piped.stderr
    assert b"round 0:" in piped.stdout, "the progress lines stay as they were"
    term = Terminal([*argv, "-j"], stdout_pipe=True)
    try:
        rc, drawn, out, _ = term.finish(120)
    finally:
        term.close()
    assert rc == 0, (out.decode(errors="replace")[-3000:], drawn.decode(errors="replace")[-2000:])
    assert json.loads(out)["violations"] == []
    assert b"\x1b[" not in drawn and b"check  [" not in drawn and b"round 0:" in drawn


def test_the_demo_shows_the_live_view_with_its_bar_and_then_its_report():
    argv = [*HMMCTL, "demo", "--duration", "3", "--check-duration", "1", "--seed", "2"]
    term = Terminal(argv)
    try:
        rc, drawn, _, _ = term.finish(150)
    finally:
        term.close()
    assert rc == 0, drawn.decode(errors="replace")[-2000:]
    screen, _, after = drawn.partition(RMCUP)
    assert screen.count(SMCUP) == 1 and after, "one full screen, left before the report"
    parts = (b"hmmirror demo  hmmd epoch", b"sessions 2  mms 1  mirrors 2", b"agent-a",
             b"agent-b", b"ack round trip  p50", b"IN FLIGHT", b"demo  [", b"s left")  # fmt: skip
    for part in parts:
        assert part in screen, part
    assert b"hmmirror demo report" in after and b"check  [" in after
    assert b"hmmirror coherence check" in after
    quiet = Terminal([*argv, "-j"], stdout_pipe=True)
    try:
        rc, drawn, out, _ = quiet.finish(150)
    finally:
        quiet.close()
    assert rc == 0, (out.decode(errors="replace")[-3000:], drawn.decode(errors="replace")[-2000:])
    assert json.loads(out)["violations"] == []
    # -j: the live view still on the terminal (stderr), but no bar anywhere
    assert SMCUP in drawn and b"demo  [" not in drawn and b"check  [" not in drawn
