"""Operations: hmmctl mms, mirrors and top against a live hmmd, and the /metrics endpoint."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import urllib.request

import pytest
from hmmirror.client import Access

HMMCTL = [sys.executable, "-m", "hmmirror.tools.ctlapp"]
PAGE = 4096


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body


def hmmctl(endpoint: str, *args: str) -> str:
    out = subprocess.run(
        [*HMMCTL, "--endpoint", endpoint, *args], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_hmmctl_mms_and_mirrors_list_what_hmmd_holds(hmmd, puppet, agent):
    addr = await puppet.mmap(4 * PAGE)
    await puppet.write(addr, b"m" * 4 * PAGE)
    async with agent(name="lister") as s:
        mirror = await s.mirror(puppet.pid, addr, 4 * PAGE, Access.READ | Access.WRITE)
        await mirror.fault(addr, 3)
        mms = await asyncio.to_thread(hmmctl, hmmd.endpoint, "mms")
        rows = mms.splitlines()
        assert rows[0].split()[:3] == ["PID", "START", "SEQ"]
        assert re.search(rf"^{puppet.pid}\s+{puppet.start_time}\s+\d+\s+0\s+1\s+proc$", mms, re.M)
        listed = await asyncio.to_thread(hmmctl, hmmd.endpoint, "mirrors")
        span = f"{addr:#x}-{addr + 4 * PAGE:#x}"
        pattern = rf"^{mirror.id}\s+lister\s+\d+\s+{puppet.pid}\s+{span}\s+3\s+rw\s+-$"
        assert re.search(pattern, listed, re.M), listed


async def test_hmmctl_top_prints_rates(hmmd, puppet, agent):
    addr = await puppet.mmap(PAGE)
    async with agent() as s:
        mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        proc = await asyncio.create_subprocess_exec(
            *HMMCTL, "--endpoint", hmmd.endpoint, "top", "--interval", "0.3", "--count", "2",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        communicate = asyncio.ensure_future(proc.communicate())
        for _ in range(2000):  # load while top samples (bounded: ~1 s of top)
            if communicate.done():
                break
            await mirror.fault(addr, 1)
            await s.sync_range(puppet.pid, addr, addr + PAGE)
        out, err = await asyncio.wait_for(communicate, 20)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split()[:4] == ["TIME", "SESS", "MMS", "MIRRORS"]
    assert len(lines) == 3
    rates = [int(line.split()[4]) for line in lines[1:]]
    assert sum(rates) > 0, lines


@pytest.mark.hmmd_args("--metrics", "127.0.0.1:0")
async def test_metrics_endpoint_serves_the_status_figures(hmmd, puppet, agent):
    addr = await puppet.mmap(PAGE)
    async with agent() as s:
        await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        url = str((await s.status())["metrics"])
        assert url.startswith("http://127.0.0.1:")
        text = await asyncio.to_thread(fetch, url)
    body = text.decode()
    assert "# TYPE hmmirror_invalidations_total counter" in body
    assert re.search(r"^hmmirror_mirrors 1\.0$", body, re.M)
    assert re.search(r"^hmmirror_sessions 1\.0$", body, re.M)
    with pytest.raises(urllib.error.HTTPError) as info:
        await asyncio.to_thread(fetch, url[: -len("metrics")])
    assert info.value.code == 404
    info.value.close()
