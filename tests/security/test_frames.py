"""Issue 11 row 9: no physical addresses to agents that were not granted them.

An agent running as a real other user mirrors that user's own process and
faults its pages in. What it receives in the PFN fields (and as
``welcome.zero_pfn``) must be frame tokens, never the PFNs this test (root)
reads from ``/proc/PID/pagemap``: Linux has hidden those from unprivileged
readers since 4.2. Tokens still say which entries name one page (a shared page
mapped twice, the zero page) and that a page was replaced (COW), and DMA
through them works. A root agent over ipc keeps real PFNs, and neither
``status`` nor ``/metrics`` carries the zero page's PFN any more.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from hmmirror.client import Access, connect
from hmmirror.proto.entries import HMM_PFN_PFN_MASK, HMM_PFN_VALID
from hmmirror.testing.pagemap import PM_PFN, PM_PRESENT, pagemap

#: How long the user's target and agent get for each answer.
USER_DEADLINE = 30.0
PAGE = 4096

#: The target, run as the user: a memfd page mapped twice (MAP_SHARED), four private pages
#: it writes, two private pages it never touches (a read fault maps the zero page there).
#: It prints the addresses, then on "cow" writes the first untouched page.
TARGET = r"""
import ctypes, json, mmap, os, sys
P = 4096
def addr(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))
fd = os.memfd_create("hmm-frames")
os.ftruncate(fd, P)
rw = mmap.PROT_READ | mmap.PROT_WRITE
sh1 = mmap.mmap(fd, P, mmap.MAP_SHARED, rw)
sh2 = mmap.mmap(fd, P, mmap.MAP_SHARED, rw)
sh1[:5] = b"hello"
anon = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
priv = mmap.mmap(-1, 4 * P, anon, rw)
for i in range(4):
    priv[i * P] = i + 1
zero = mmap.mmap(-1, 2 * P, anon, rw)
print(json.dumps({"sh1": addr(sh1), "sh2": addr(sh2), "priv": addr(priv), "zero": addr(zero)}),
      flush=True)
for line in sys.stdin:
    if line.strip() == "cow":
        zero[0] = 7
        print("written", flush=True)
"""

#: The agent, run as the user: mirror the four regions, fault them in, DMA through the
#: entries, try a DMA that names a page by the PFN given in argv; print what it got. On
#: "again" it faults the zero region in once more and prints those entries.
AGENT = r"""
import asyncio, json, sys
from hmmirror.client import Access, RemoteError, connect
from hmmirror.proto.entries import HMM_PFN_VALID, to_wire
from hmmirror.proto.messages import DmaRead
import numpy as np

async def main(endpoint, pid, where, forged):
    r = json.loads(where)
    rw = Access.READ | Access.WRITE
    async with connect(endpoint, name="frames-probe") as s:
        out = {"zero_pfn": s.welcome.zero_pfn, "frames": getattr(s.welcome, "frames", None)}
        regions = {"sh1": (r["sh1"], 1), "sh2": (r["sh2"], 1), "priv": (r["priv"], 4),
                   "zero": (r["zero"], 2)}
        mirrors = {}
        for name, (a, n) in regions.items():
            m = await s.mirror(pid, a, n * 4096, rw if name != "zero" else Access.READ)
            await m.fault(a, n)
            mirrors[name] = m
            out[name] = [int(x) for x in m.table[:n]]
        got = await mirrors["sh1"].read(r["sh1"], 1)
        out["dma_read"] = got.data[:5].decode()
        last = r["priv"] + 3 * 4096
        await mirrors["priv"].write(last, b"w" * 4096)
        out["dma_roundtrip"] = (await mirrors["priv"].read(last, 1)).data[:3].decode()
        entry = np.array([HMM_PFN_VALID | int(forged)], dtype=np.uint64)
        try:
            await s.request(DmaRead(mirror=mirrors["sh1"].id, start=r["sh1"], npages=1),
                            [to_wire(entry)])
            out["forged_dma"] = "served"
        except RemoteError as exc:
            out["forged_dma"] = getattr(exc.code, "name", str(exc.code))
        print(json.dumps(out), flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() == "again":
            z = mirrors["zero"]
            await z.fault(r["zero"], 2)
            print(json.dumps({"zero": [int(x) for x in z.table[:2]]}), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
"""


def real_pfns(pid: int, addr: int, npages: int) -> list[int]:
    """The PFNs pagemap shows root for [addr, +npages) of ``pid``; fails on an absent page."""
    out = []
    for i, word in enumerate(pagemap(pid, addr, npages).tolist()):
        assert word & PM_PRESENT, f"page {addr + i * PAGE:#x} of pid {pid} is not present"
        out.append(word & PM_PFN)
    assert all(out), "root reads PFN 0: this test needs CAP_SYS_ADMIN to see PFNs"
    return out


def field(entry: int) -> int:
    """An entry's PFN field."""
    assert entry & HMM_PFN_VALID, f"entry {entry:#x} is not VALID"
    return entry & HMM_PFN_PFN_MASK


async def line_of(proc: Any, what: str) -> str:
    """The next stdout line of ``proc``, within the users' deadline."""
    try:
        line: str = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), USER_DEADLINE)
    except TimeoutError:
        proc.kill()
        pytest.fail(f"{what} said nothing in {USER_DEADLINE:.0f} s: {proc.stderr.read()[-2000:]}")
    if not line:
        pytest.fail(f"{what} exited ({proc.wait()}): {proc.stderr.read()[-2000:]}")
    return line


async def test_agent_of_another_user_gets_frame_tokens_not_pfns(
    hmmd: Any, hmmd_group: str, make_user: Callable[..., Any]
) -> None:
    user = make_user(groups=(hmmd_group,))
    target = user.popen(user.python(TARGET))
    where = json.loads(await line_of(target, "the target"))
    pid = target.pid
    sh_pfn = real_pfns(pid, where["sh1"], 1)[0]
    agent = user.popen(user.python(AGENT, hmmd.endpoint, str(pid), json.dumps(where), str(sh_pfn)))
    got = json.loads(await line_of(agent, "the agent"))
    real = {
        "sh1": real_pfns(pid, where["sh1"], 1),
        "sh2": real_pfns(pid, where["sh2"], 1),
        "priv": real_pfns(pid, where["priv"], 4),
        "zero": real_pfns(pid, where["zero"], 2),
    }
    zero_pfn = real["zero"][0]
    assert real["zero"][1] == zero_pfn and real["sh1"] == real["sh2"]  # the setup holds

    # The attack: the agent must not learn a single physical frame number.
    for name, pfns in real.items():
        for i, (entry, pfn) in enumerate(zip(got[name], pfns, strict=True)):
            assert field(entry) != pfn, f"{name}[{i}]: the agent got the real PFN {pfn:#x}"
    assert got["zero_pfn"] != zero_pfn, "welcome.zero_pfn is the zero page's real PFN"
    assert got["forged_dma"] == "STALE", "a DMA naming a page by its real PFN was served"
    assert got["frames"] == "token"

    # Tokens still say which entries name one page, and tell the zero page apart.
    assert got["zero_pfn"] != 0
    assert field(got["sh1"][0]) == field(got["sh2"][0]), "one shared page, two tokens"
    assert len({field(e) for e in got["priv"]}) == 4, "four pages, fewer tokens"
    assert [field(e) for e in got["zero"]] == [got["zero_pfn"]] * 2
    assert got["dma_read"] == "hello" and got["dma_roundtrip"] == "www"  # DMA via tokens

    # A COW break replaces the zero page: the token changes with it.
    target.stdin.write("cow\n")
    target.stdin.flush()
    assert (await line_of(target, "the target")).strip() == "written"
    agent.stdin.write("again\n")
    agent.stdin.flush()
    after = json.loads(await line_of(agent, "the agent"))["zero"]
    new_pfn = real_pfns(pid, where["zero"], 1)[0]
    assert new_pfn != zero_pfn
    assert field(after[0]) not in (got["zero_pfn"], new_pfn)
    assert field(after[1]) == got["zero_pfn"]


@pytest.mark.hmmd_args("--metrics", "127.0.0.1:0")
async def test_root_agent_gets_physical_frames_and_no_zero_pfn_is_published(
    hmmd: Any, hmmd_group: str, make_user: Callable[..., Any]
) -> None:
    user = make_user(groups=(hmmd_group,))
    target = user.popen(user.python(TARGET))
    where = json.loads(await line_of(target, "the target"))
    async with connect(hmmd.endpoint, name="root-agent") as s:
        shared = await s.mirror(target.pid, where["sh1"], PAGE, Access.READ)
        await shared.fault(where["sh1"], 1)
        zero = await s.mirror(target.pid, where["zero"], 2 * PAGE, Access.READ)
        await zero.fault(where["zero"], 2)
        real_zero = real_pfns(target.pid, where["zero"], 2)
        assert getattr(s.welcome, "frames", "physical") == "physical"
        assert field(int(shared.table[0])) == real_pfns(target.pid, where["sh1"], 1)[0]
        assert [field(int(e)) for e in zero.table] == real_zero
        assert s.welcome.zero_pfn == real_zero[0]
        status = await s.status()
    assert "zero_pfn" not in status, f"status carries zero_pfn = {status['zero_pfn']:#x}"
    url = str(status["metrics"])
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert "hmmirror_sessions" in text  # the endpoint works...
    assert "zero_pfn" not in text  # ...and hides the zero page
