"""The checks that run inside the booted container, as the oneshot unit hmm-live-checks.service.

The container is a minimal Debian with the built wheels in /opt/hmmirror and deploy/'s units
installed as deploy/README.md says (install.sh). hmmd.service runs as its own user with its own
capabilities and system call filter; these checks drive it only through the public CLIs and
library (systemctl, ``hmmirror.client`` in agent processes of real users, the
``hmmirror.testing`` puppet as the target processes, hm-agent@.service), and write every
outcome to /hmm-live/results.json, which the host test reads once the container powered off
(the unit's SuccessAction/FailureAction). A check that raises is recorded as failed, with the
error; the others still run.

Users (install.sh): hmm-target (2001) owns the targets, hmm-agent (2002) is granted read and
write on uid 2001 by /etc/hmmirror/policy.toml, hmm-stranger (2003) is granted nothing; all
three are in group hmmirror (the socket's). hmmd polls /proc only every 5 s here
(/etc/hmmirror/hmmd.toml), so an invalidation within EVENT_DEADLINE can only have come through
the target's userfaultfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from hmmirror.testing.puppet import Puppet

RESULTS = Path("/hmm-live/results.json")
STAGE = Path("/hmm-stage")
ENDPOINT = "ipc:///run/hmmirror/hmmd.sock"
PYTHON = "/opt/hmmirror/bin/python"
PAGE = 4096
#: How long an invalidation through the userfaultfd may take (the proc watcher polls every 5 s).
EVENT_DEADLINE = 1.5
#: Every single step (a systemctl call, an agent's answer, a unit's start) is bounded by this.
STEP_DEADLINE = 20.0
#: hm-agent@'s RDMA listener in the container (its own network namespace: loopback only).
AGENT_PORT = 18515
#: How long hm-agent@ gets to become active (READY=1) or fail (it takes about a second).
AGENT_START_DEADLINE = 10.0
#: The whole run's budget; the host kills the container a while after it.
RUN_DEADLINE = 100.0

Detail = dict[str, Any]


class Results:
    """Each check's outcome, written to RESULTS after every check (a crash keeps the rest)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.doc: dict[str, Any] = {"checks": {}, "journal": {}, "elapsed": 0.0}

    def record(self, name: str, ok: bool, detail: Detail) -> None:
        """Store one outcome and say it on the console."""
        self.doc["checks"][name] = {"ok": ok, "detail": detail}
        print(f"hm-live: {'PASS' if ok else 'FAIL'} {name}: {json.dumps(detail)[:300]}", flush=True)
        self.save()

    def save(self) -> None:
        """Write the document (atomically)."""
        self.doc["elapsed"] = round(time.monotonic() - self.t0, 2)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(RESULTS)

    async def run(self, name: str, check: Callable[[], Awaitable[tuple[bool, Detail]]]) -> None:
        """Run one check under STEP_DEADLINE x 2; an exception is a failure with its reason."""
        try:
            async with asyncio.timeout(2 * STEP_DEADLINE):
                ok, detail = await check()
        except Exception as exc:
            ok, detail = False, {"error": repr(exc), "where": traceback.format_exc()[-1500:]}
        self.record(name, ok, detail)


def sh(*argv: str, timeout: float = STEP_DEADLINE) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (text, both outputs captured), within the deadline."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def show(unit: str, *props: str) -> dict[str, str]:
    """``systemctl show`` of ``props``."""
    out = sh("systemctl", "show", unit, "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_setting(unit_file: str, key: str) -> str:
    """The last ``key=`` value in an installed unit file."""
    value = ""
    for line in Path(unit_file).read_text().splitlines():
        if line.startswith(f"{key}="):
            value = line.split("=", 1)[1].strip()
    return value


def cap_mask(names: str) -> int:
    """The capability bit mask of ``CAP_A CAP_B`` (numbers from setpriv --list-caps' order)."""
    known = sh("setpriv", "--list-caps").stdout.split()
    return sum(1 << known.index(n.lower().removeprefix("cap_")) for n in names.split())


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in text.splitlines() if ":" in ln)}


def nofile(pid: int) -> tuple[int, int]:
    """A process's RLIMIT_NOFILE (soft, hard)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise ValueError(f"no open-files limit for {pid}")


def fd_table(pid: int) -> dict[str, str]:
    """A process's open fds and what they are."""
    return {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}


def uffd_features(pid: int, fd: int) -> int:
    """The features field of a userfaultfd's fdinfo (0 until someone ran UFFDIO_API on it)."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("API:"):
            return int(line.split()[1].split(":")[1], 16)
    raise ValueError(f"fd {fd} of {pid} is no userfaultfd")


class Agent:
    """An agent.py process as a real user: one JSON command, one JSON answer."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, user: str, endpoint: str = ENDPOINT) -> AsyncIterator[Agent]:
        """Run agent.py as ``user`` with hmmd at ``endpoint``; kill it afterwards."""
        proc = await asyncio.create_subprocess_exec(
            str(STAGE / f"as-{user}"),
            str(STAGE / "agent.py"),
            endpoint,
            f"live-{user}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        agent = cls(proc, user)
        try:
            hello = await agent.answer()
            if not hello.get("ok"):
                raise RuntimeError(f"agent {user} could not open a session: {hello}")
            yield agent
        finally:
            if proc.returncode is None:
                proc.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()

    async def answer(self) -> dict[str, Any]:
        """The next answer line (STEP_DEADLINE)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(STEP_DEADLINE):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {self.name} exited ({await self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one command; its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.answer()

    async def must(self, op: str, **args: Any) -> dict[str, Any]:
        """``ask``, raising unless it succeeded."""
        answer = await self.ask(op, **args)
        if not answer.get("ok"):
            raise RuntimeError(f"{self.name} {op}: {answer}")
        return answer


@contextlib.asynccontextmanager
async def target(user: str | None) -> AsyncIterator[Puppet]:
    """A puppet target process of ``user`` (root when None)."""
    python = str(STAGE / f"as-{user}") if user else PYTHON
    async with Puppet.spawn(python=python, timeout=STEP_DEADLINE) as puppet:
        yield puppet


async def filled(puppet: Puppet, npages: int, tag: bytes) -> int:
    """Map ``npages`` in ``puppet``, each page starting with ``tag`` and its index; the address."""
    addr = await puppet.mmap(npages * PAGE)
    for i in range(npages):
        await puppet.write(addr + i * PAGE, tag + bytes([i]) * 8)
    return addr


class Live:
    """The checks, in order; hmmd's identity and the watchdog's first sample are kept."""

    def __init__(self, results: Results) -> None:
        self.results = results
        self.main_pid = 0
        self.watchdog0 = 0
        self.watchdog_t0 = 0.0

    async def hmmd_ready(self) -> tuple[bool, Detail]:
        """hmmd.service is active (READY=1 came), with hmmd's STATUS= text and no restart."""
        deadline = time.monotonic() + STEP_DEADLINE
        while (state := show("hmmd", "ActiveState")["ActiveState"]) == "activating":
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        d = show(
            "hmmd",
            "Type",
            "ActiveState",
            "SubState",
            "StatusText",
            "MainPID",
            "NRestarts",
            "WatchdogUSec",
            "WatchdogTimestampMonotonic",
            "NotifyAccess",
        )
        self.main_pid = int(d["MainPID"])
        self.watchdog0 = int(d["WatchdogTimestampMonotonic"] or 0)
        self.watchdog_t0 = time.monotonic()
        ok = (
            state == "active"
            and d["SubState"] == "running"
            and d["Type"] == "notify"
            and d["StatusText"].startswith("serving on ipc://")
            and d["NRestarts"] == "0"
        )
        return ok, d

    async def install_layout(self) -> tuple[bool, Detail]:
        """deploy/'s sysusers.d and tmpfiles.d files made the users and /etc/hmmirror: system
        users, hmmirror-agent in group hmmirror, the directory root's and group-readable; and
        every unit's Documentation= file exists."""
        daemon, agent = pwd.getpwnam("hmmirror"), pwd.getpwnam("hmmirror-agent")
        group = grp.getgrnam("hmmirror")
        etc = os.stat("/etc/hmmirror")
        docs = [
            url.removeprefix("file:")
            for unit in ("hmmd.service", "hm-agent@.service")
            for url in unit_setting(f"/etc/systemd/system/{unit}", "Documentation").split()
        ]
        missing = [d for d in docs if not Path(d).is_file()]
        detail: Detail = {
            "uids": [daemon.pw_uid, agent.pw_uid],
            "hmmirror_members": group.gr_mem,
            "etc_mode": oct(etc.st_mode & 0o7777),
            "etc_owner": [etc.st_uid, etc.st_gid],
            "docs": docs,
            "missing_docs": missing,
        }
        ok = (
            daemon.pw_uid < 1000
            and agent.pw_uid < 1000
            and daemon.pw_gid == group.gr_gid
            and "hmmirror-agent" in group.gr_mem
            and etc.st_mode & 0o7777 == 0o750
            and (etc.st_uid, etc.st_gid) == (0, group.gr_gid)
            and bool(docs)
            and not missing
        )
        return ok, detail

    async def journal_priorities(self) -> tuple[bool, Detail]:
        """hmmd's lines reach the journal with their level as the entry's PRIORITY (the
        sd-daemon ``<N>`` prefix, stripped by journald) and without a timestamp of their own."""
        out = sh("journalctl", "--no-pager", "-b", "-u", "hmmd.service", "-o", "json").stdout
        want = {"debug": "7", "info": "6", "warning": "4", "error": "3", "critical": "2"}
        seen: dict[str, int] = {}
        wrong = []
        for line in out.splitlines():
            entry = json.loads(line)
            if entry.get("_PID") != str(self.main_pid) or not isinstance(entry["MESSAGE"], str):
                continue
            level = entry["MESSAGE"].split(" ", 1)[0]
            if level not in want:
                continue  # a traceback's continuation line
            seen[level] = seen.get(level, 0) + 1
            if entry.get("PRIORITY") != want[level] or entry["MESSAGE"][:1].isdigit():
                wrong.append({"MESSAGE": entry["MESSAGE"][:200], "PRIORITY": entry.get("PRIORITY")})
        return bool(seen.get("info")) and not wrong, {"levels": seen, "wrong": wrong[:5]}

    async def hmmd_credentials(self) -> tuple[bool, Detail]:
        """hmmd runs as hmmirror with exactly the unit's capabilities, NoNewPrivs, seccomp."""
        unit = "/etc/systemd/system/hmmd.service"
        want = cap_mask(unit_setting(unit, "AmbientCapabilities"))
        st = proc_status(self.main_pid)
        hmmirror = pwd.getpwnam("hmmirror")
        caps = {k: int(st[k], 16) for k in ("CapEff", "CapPrm", "CapAmb", "CapBnd")}
        uids = {int(x) for x in st["Uid"].split()}
        ok = (
            uids == {hmmirror.pw_uid}
            and set(caps.values()) == {want}
            and st["NoNewPrivs"] == "1"
            and st["Seccomp"] == "2"
        )
        detail = {k: hex(v) for k, v in caps.items()}
        detail |= {
            "want": hex(want),
            "Uid": st["Uid"],
            "NoNewPrivs": st["NoNewPrivs"],
            "Seccomp": st["Seccomp"],
        }
        return ok, detail

    async def hmmd_nofile(self) -> tuple[bool, Detail]:
        """hmmd's RLIMIT_NOFILE is the unit's LimitNOFILE=, soft and hard (as far as the
        container's own hard limit lets systemd go)."""
        want = int(unit_setting("/etc/systemd/system/hmmd.service", "LimitNOFILE") or 0)
        soft, hard = nofile(self.main_pid)
        ceiling = nofile(1)[1]
        detail = {"soft": soft, "hard": hard, "LimitNOFILE": want, "pid1_hard": ceiling}
        return want > 0 and soft == hard == min(want, ceiling), detail

    async def hmmd_nice(self) -> tuple[bool, Detail]:
        """Every hmmd thread runs at the unit's Nice= (libzmq's threads inherit it), and hmmd,
        whose filter refuses setpriority, did not try to change it and warn; libzmq's threads
        run under SCHED_BATCH, which the filter lets libzmq set."""
        want = int(unit_setting("/etc/systemd/system/hmmd.service", "Nice") or 0)
        tasks = Path(f"/proc/{self.main_pid}/task")
        nices = sorted({os.getpriority(os.PRIO_PROCESS, int(t.name)) for t in tasks.iterdir()})
        log = sh("journalctl", "-u", "hmmd", "--no-pager", "-o", "cat").stdout
        warned = [ln for ln in log.splitlines() if "cannot run at nice" in ln]
        detail = {"Nice": want, "thread_nices": nices, "threads": len(list(tasks.iterdir()))}
        detail["warned"] = warned[:2]
        # libzmq starts its threads with hmmd's first socket: a client's connection.
        detail["status_rc"] = sh("hmmctl", "--endpoint", ENDPOINT, "status").returncode
        detail["zmq_policies"] = policies = zmq_policies(self.main_pid)
        batch = policies == [os.SCHED_BATCH]
        return want < 0 and nices == [want] and not warned and batch, detail

    async def hmmd_tcp_endpoint(self) -> tuple[bool, Detail]:
        """The unit's sandbox lets hmmd bind a tcp:// endpoint (libzmq asks netlink first): a
        copy of hmmd.service on tcp://127.0.0.1:5555 (plain TCP, the container's own network)
        becomes ready and answers hmmctl status."""
        text = Path("/etc/systemd/system/hmmd.service").read_text()
        text = text.replace(
            "ExecStart=/usr/local/bin/hmmd run",
            "ExecStart=/usr/local/bin/hmmd run --endpoint tcp://127.0.0.1:5555 --insecure",
        )
        text = text.replace("RuntimeDirectory=hmmirror\n", "RuntimeDirectory=hmmirror-tcp\n")
        Path("/run/systemd/system").mkdir(parents=True, exist_ok=True)
        Path("/run/systemd/system/hmmd-tcp.service").write_text(text)
        sh("systemctl", "daemon-reload")
        try:
            started = sh("systemctl", "start", "hmmd-tcp")
            d = show("hmmd-tcp", "ActiveState", "StatusText", "NRestarts")
            status = sh("hmmctl", "--endpoint", "tcp://127.0.0.1:5555", "status")
            d |= {
                "start_rc": started.returncode,
                "status_rc": status.returncode,
                "status": (status.stdout + status.stderr)[-300:],
            }
            ok = started.returncode == 0 and d["ActiveState"] == "active" and status.returncode == 0
            return ok, d
        finally:
            sh("systemctl", "stop", "hmmd-tcp")

    async def granted_mirror(self) -> tuple[bool, Detail]:
        """hmm-agent mirrors, reads and writes a process of hmm-target (granted): pagemap,
        process_vm_readv and process_vm_writev through the unit's user and capabilities."""
        async with target("hmm-target") as t, Agent.start("hmm-agent") as a:
            addr = await filled(t, 4, b"granted!")
            m = await a.must("mirror", pid=t.pid, addr=addr, length=4 * PAGE, write=True)
            data = bytes.fromhex(
                (await a.must("read", mirror=m["mirror"], addr=addr, npages=4))["data"]
            )
            read_ok = all(
                data[i * PAGE : i * PAGE + 16] == b"granted!" + bytes([i]) * 8 for i in range(4)
            )
            page = b"written by hmm-agent".ljust(PAGE, b".")
            await a.must("write", mirror=m["mirror"], addr=addr + PAGE, data=page.hex())
            seen = await t.read(addr + PAGE, 20)
            return read_ok and seen == page[:20], {
                "read": data[:16].hex(),
                "target_sees": str(seen),
            }

    async def ungranted_refused(self) -> tuple[bool, Detail]:
        """Everything no grant covers is PERMISSION_DENIED: a stranger on hmm-target's process,
        hmm-agent on root's, on hmmd itself and on the stranger's."""
        detail: Detail = {}
        async with (
            target("hmm-target") as t,
            target(None) as root_t,
            target("hmm-stranger") as s_t,
            Agent.start("hmm-agent") as a,
            Agent.start("hmm-stranger") as s,
        ):
            cases = [
                ("stranger->target", s, t.pid, await filled(t, 1, b"target..")),
                ("agent->root", a, root_t.pid, await filled(root_t, 1, b"root....")),
                ("agent->stranger", a, s_t.pid, await filled(s_t, 1, b"stranger")),
                ("agent->hmmd", a, self.main_pid, 0),
            ]
            for label, who, pid, addr in cases:
                answer = await who.ask("mirror", pid=pid, addr=addr, length=PAGE)
                detail[label] = answer.get("code") or answer
        ok = all(v == "PERMISSION_DENIED" for v in detail.values())
        return ok, detail

    async def own_uid_without_grant(self) -> tuple[bool, Detail]:
        """The default rule: an agent may mirror its own processes without a grant."""
        async with target("hmm-stranger") as t, Agent.start("hmm-stranger") as s:
            addr = await filled(t, 1, b"my own..")
            answer = await s.ask("mirror", pid=t.pid, addr=addr, length=PAGE)
            return bool(answer.get("ok")), answer

    async def watched(self, t: Puppet, a: Agent, npages: int = 2) -> tuple[int, int, Detail]:
        """Mirror ``npages`` of ``t`` and fault them; munmap the first: (addr, mirror, what
        came within EVENT_DEADLINE)."""
        addr = await filled(t, npages, b"watched.")
        m = (await a.must("mirror", pid=t.pid, addr=addr, length=npages * PAGE))["mirror"]
        await a.must("fault", mirror=m, addr=addr, npages=npages)
        await t.munmap(addr, PAGE)
        got = await a.must("events", mirror=m, n=1, timeout=EVENT_DEADLINE)
        return addr, m, got

    async def uffd_expose(self) -> tuple[bool, Detail]:
        """The target's expose(): hmmd takes its userfaultfd over the intake socket; an munmap
        arrives as UNMAP at once (uffd events, UFFDIO_API with fork events)."""
        async with target("hmm-target") as t, Agent.start("hmm-agent") as a:
            await t.expose(ENDPOINT)
            _, _, got = await self.watched(t, a)
            st = (await a.must("status"))["status"]
            ok = [e[2] for e in got["events"]][:1] == ["UNMAP"] and int(st["uffd_watched"]) >= 1
            return ok, {"events": got, "uffd_watched": st["uffd_watched"]}

    async def watch_writes(self) -> tuple[bool, Detail]:
        """Written-page tracking (PAGEMAP_SCAN, UFFDIO_WRITEPROTECT): exactly the pages the
        target wrote come back as WRITTEN."""
        async with target("hmm-target") as t, Agent.start("hmm-agent") as a:
            await t.expose(ENDPOINT)
            addr = await filled(t, 8, b"tracked.")
            m = (await a.must("mirror", pid=t.pid, addr=addr, length=8 * PAGE, watch_writes=True))[
                "mirror"
            ]
            await a.must("fault", mirror=m, addr=addr, npages=8)
            for page in (1, 5):
                await t.write(addr + page * PAGE + 100, b"w")
            got = await a.must("events", mirror=m, n=2, timeout=EVENT_DEADLINE)
            await asyncio.sleep(0.2)
            got = await a.must("events", mirror=m, n=0, timeout=0)
            pages = {
                p
                for s, e, ev in got["events"]
                if ev == "WRITTEN"
                for p in range((s - addr) // PAGE, (e - addr) // PAGE)
            }
            return pages == {1, 5}, {"written_pages": sorted(pages), "events": got["events"]}

    async def uffd_pidfd_getfd(self) -> tuple[bool, Detail]:
        """A userfaultfd the target left open: hmmd takes it with pidfd_getfd and configures it."""
        async with target("hmm-target") as t, Agent.start("hmm-agent") as a:
            fd = await t.uffd_leave()
            before = uffd_features(t.pid, fd)
            _, _, got = await self.watched(t, a)
            after = uffd_features(t.pid, fd)
            ok = before == 0 and after != 0 and [e[2] for e in got["events"]][:1] == ["UNMAP"]
            return ok, {"features_before": before, "features_after": hex(after), "events": got}

    async def uffd_inject(self) -> tuple[bool, Detail]:
        """A target that offers nothing: hmmd creates a userfaultfd in it with ptrace
        (PTRACE_SEIZE, injected syscalls, pidfd_getfd) and leaves its fd table as it was."""
        async with target("hmm-target") as t, Agent.start("hmm-agent") as a:
            st0 = (await a.must("status"))["status"]
            before = fd_table(t.pid)
            _, _, got = await self.watched(t, a)
            st1 = (await a.must("status"))["status"]
            after = fd_table(t.pid)
            alive = (await t.ping())["pid"] == t.pid
            ok = (
                int(st1["uffd_watched"]) == int(st0["uffd_watched"]) + 1
                and st1["uffd_refusals"] == st0["uffd_refusals"]
                and before == after
                and alive
                and [e[2] for e in got["events"]][:1] == ["UNMAP"]
            )
            return ok, {
                "events": got,
                "refusal": st1.get("uffd_last_refusal", ""),
                "fd_table_kept": before == after,
            }

    async def hm_agent_ready(self) -> tuple[bool, Detail]:
        """hm-agent@nic0 becomes active only once it serves: at the first moment systemd says
        active (READY=1 came), its listener accepts a connection."""
        async with target("hmm-target") as t:
            addr = await filled(t, 2, b"rdma mr.")
            write_agent_config(
                "nic0", f"tcp://127.0.0.1:{AGENT_PORT}", [f"{t.pid}:{addr:#x}:8K:rw"]
            )
            try:
                d = await start_agent_unit("nic0", until={"active", "failed"})
                d["serving_when_active"] = d["states"][-1] == "active" and tcp_accepts(AGENT_PORT)
                d |= show("hm-agent@nic0", "Type", "StatusText", "ExecMainStatus", "NRestarts",
                          "MainPID")  # fmt: skip
                # The unit's filter lets libzmq's threads run under SCHED_BATCH.
                d["zmq_policies"] = zmq_policies(int(d["MainPID"]))
                batch = d["zmq_policies"] == [os.SCHED_BATCH]
                return d["Type"] == "notify" and d["serving_when_active"] and batch, d
            finally:
                sh("systemctl", "stop", "hm-agent@nic0")

    async def hm_agent_bad_listen(self, instance: str, listen: str) -> tuple[bool, Detail]:
        """hm-agent@ with a listen endpoint it cannot bind fails at once with exit 2, and is
        not restarted."""
        try:
            with socket.create_server(("127.0.0.1", AGENT_PORT + 1)) as _busy:
                write_agent_config(instance, listen, [])
                d = await start_agent_unit(instance, until={"failed"})
                await asyncio.sleep(1.5)  # RestartSec=1s: a restart would show by now
            d |= show(
                f"hm-agent@{instance}", "ActiveState", "Result", "ExecMainStatus", "NRestarts"
            )
            ok = (
                d["ActiveState"] == "failed"
                and d["ExecMainStatus"] == "2"
                and d["NRestarts"] == "0"
                and d["seconds"] < AGENT_START_DEADLINE
            )
            return ok, d
        finally:
            sh("systemctl", "stop", f"hm-agent@{instance}")

    async def hmmd_watchdog(self) -> tuple[bool, Detail]:
        """hmmd pinged the watchdog while the checks ran (WATCHDOG=1 every WatchdogSec/2), and
        is still the same process, never restarted."""
        wait = 6.0 - (time.monotonic() - self.watchdog_t0)  # more than WatchdogSec/2 (5 s)
        if wait > 0:
            await asyncio.sleep(wait)
        d = show(
            "hmmd",
            "ActiveState",
            "MainPID",
            "NRestarts",
            "WatchdogUSec",
            "WatchdogTimestampMonotonic",
        )
        last = int(d["WatchdogTimestampMonotonic"] or 0)
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d |= {"first_ping_us": self.watchdog0, "since_last_ping_s": round((now_us - last) / 1e6, 2)}
        ok = (
            self.watchdog0 > 0
            and last > self.watchdog0
            and d["WatchdogUSec"] == "10s"
            and (now_us - last) < 10_000_000
            and d["ActiveState"] == "active"
            and int(d["MainPID"]) == self.main_pid
            and d["NRestarts"] == "0"
        )
        return ok, d

    async def hmmd_instances(self) -> tuple[bool, Detail]:
        """hmmd@0 and hmmd@1 (hmmd@.service) serve beside hmmd.service on
        /run/hmmirror/hmmd-N.sock and share its hmmd-owners claims (hmmd's user, 0700): a
        process mirrored through @0 is refused MOVED at @1, naming @0. hm-agent@ given the
        three endpoints becomes active, serving an MR of that process (registered at @0
        through MOVED), and every instance stays up. Stopping @1 leaves @0 serving with its
        socket, and hm-agent@ started again with the same three, @1 among them, becomes
        active all the same (it warns of @1 and serves through the others)."""
        sockets = {i: f"/run/hmmirror/hmmd-{i}.sock" for i in (0, 1)}
        units = ("hmmd@0", "hmmd@1", "hmmd")
        port = AGENT_PORT + 2
        d: Detail = {}
        try:
            d["start_rc"] = sh("systemctl", "start", "hmmd@0", "hmmd@1").returncode
            d["active"] = [show(u, "ActiveState")["ActiveState"] for u in units]
            owners = os.stat("/run/hmmirror/hmmd-owners")
            hmmirror = pwd.getpwnam("hmmirror").pw_uid
            d["owners"] = [owners.st_uid == hmmirror, oct(owners.st_mode & 0o777)]
            async with (
                target("hmm-target") as t,
                Agent.start("hmm-agent", f"ipc://{sockets[0]}") as first,
                Agent.start("hmm-agent", f"ipc://{sockets[1]}") as second,
            ):
                addr = await filled(t, 2, b"instance")
                await first.must("mirror", pid=t.pid, addr=addr, length=2 * PAGE)
                d["at_1"] = await second.ask("mirror", pid=t.pid, addr=addr, length=2 * PAGE)
                every = ",".join([ENDPOINT, *(f"ipc://{s}" for s in sockets.values())])
                write_agent_config(
                    "multi", f"tcp://127.0.0.1:{port}", [f"{t.pid}:{addr:#x}:8K:rw"], every
                )
                try:
                    agent = await start_agent_unit("multi", until={"active", "failed"})
                    d["agent"] = agent["states"][-1], tcp_accepts(port)
                    d["active_with_agent"] = [show(u, "ActiveState")["ActiveState"] for u in units]
                finally:
                    sh("systemctl", "stop", "hm-agent@multi")
                d["stop_1_rc"] = sh("systemctl", "stop", "hmmd@1").returncode
                try:
                    agent = await start_agent_unit("multi", until={"active", "failed"})
                    d["agent_without_1"] = agent["states"][-1], tcp_accepts(port)
                finally:
                    sh("systemctl", "stop", "hm-agent@multi")
            status_0 = sh("hmmctl", "--endpoint", f"ipc://{sockets[0]}", "status")
            d["after"] = {
                "hmmd@0": show("hmmd@0", "ActiveState")["ActiveState"],
                "socket_0": os.path.exists(sockets[0]),
                "status_0_rc": status_0.returncode,
            }
            moved = d["at_1"].get("code") == "MOVED" and sockets[0] in d["at_1"].get("error", "")
            ok = (
                d["start_rc"] == 0
                and d["active"] == d["active_with_agent"] == ["active"] * 3
                and d["owners"] == [True, "0o700"]
                and moved
                and d["agent"] == d["agent_without_1"] == ("active", True)
                and d["after"] == {"hmmd@0": "active", "socket_0": True, "status_0_rc": 0}
            )
            return ok, d
        finally:
            sh("systemctl", "stop", "hmmd@0", "hmmd@1")


async def start_agent_unit(instance: str, until: set[str]) -> Detail:
    """``systemctl start --no-block hm-agent@INSTANCE``, then its ActiveState every 20 ms
    until one in ``until`` or AGENT_START_DEADLINE: the states seen and the seconds taken."""
    t0 = time.monotonic()
    sh("systemctl", "start", "--no-block", f"hm-agent@{instance}")
    states: list[str] = []
    while time.monotonic() - t0 < AGENT_START_DEADLINE:
        state = show(f"hm-agent@{instance}", "ActiveState")["ActiveState"]
        if not states or states[-1] != state:
            states.append(state)
        if state in until:
            break
        await asyncio.sleep(0.02)
    return {"states": states, "seconds": round(time.monotonic() - t0, 2)}


def zmq_policies(pid: int) -> list[int]:
    """The scheduling policies of ``pid``'s libzmq threads (``ZMQbg/...``), sorted, once each."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            if (task / "comm").read_text().startswith("ZMQbg/"):
                found.add(os.sched_getscheduler(int(task.name)))
    return sorted(found)


def tcp_accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def write_agent_config(instance: str, listen: str, mrs: list[str], daemon: str = ENDPOINT) -> None:
    """/etc/hmmirror/agent-INSTANCE.toml. A plain-TCP listener must say so (``insecure``)
    where hm-agent knows that setting: the container has a network of its own."""
    lines = [
        f'daemon = "{daemon}"',
        f'listen = "{listen}"',
        f'name = "{instance}"',
        "mr = [" + ", ".join(f'"{m}"' for m in mrs) + "]",
    ]
    if listen.startswith("tcp://") and "--insecure" in sh("hm-agent", "--help").stdout:
        lines.append("insecure = true")
    Path(f"/etc/hmmirror/agent-{instance}.toml").write_text("\n".join(lines) + "\n")


def collect_journal(results: Results) -> None:
    """The units' journals, for whoever reads a failure."""
    for unit in ("hmmd", "hmmd-tcp", "hm-agent@nic0", "hm-agent@busy", "hm-agent@scheme",
                 "hmmd@0", "hmmd@1", "hm-agent@multi"):  # fmt: skip
        out = sh("journalctl", "--no-pager", "-o", "short-monotonic", "-u", unit, "-n", "80")
        results.doc["journal"][unit] = out.stdout[-8000:]
    results.save()


async def main() -> int:
    """Every check, then the journals; exit 0 only if every check passed."""
    results = Results()
    live = Live(results)
    try:
        async with asyncio.timeout(RUN_DEADLINE):
            await results.run("hmmd_ready", live.hmmd_ready)
            await results.run("install_layout", live.install_layout)
            await results.run("hmmd_credentials", live.hmmd_credentials)
            await results.run("hmmd_nofile", live.hmmd_nofile)
            await results.run("hmmd_nice", live.hmmd_nice)
            await results.run("hmmd_tcp_endpoint", live.hmmd_tcp_endpoint)
            await results.run("granted_mirror", live.granted_mirror)
            await results.run("ungranted_refused", live.ungranted_refused)
            await results.run("own_uid_without_grant", live.own_uid_without_grant)
            await results.run("uffd_expose", live.uffd_expose)
            await results.run("watch_writes", live.watch_writes)
            await results.run("uffd_pidfd_getfd", live.uffd_pidfd_getfd)
            await results.run("uffd_inject", live.uffd_inject)
            await results.run("hm_agent_ready", live.hm_agent_ready)
            await results.run(
                "hm_agent_bad_listen_busy",
                lambda: live.hm_agent_bad_listen("busy", f"tcp://127.0.0.1:{AGENT_PORT + 1}"),
            )
            await results.run(
                "hm_agent_bad_listen_scheme",
                lambda: live.hm_agent_bad_listen("scheme", "udp://127.0.0.1:9"),
            )
            await results.run("hmmd_watchdog", live.hmmd_watchdog)
            await results.run("journal_priorities", live.journal_priorities)
            await results.run("hmmd_instances", live.hmmd_instances)
    except TimeoutError:
        results.doc["timeout"] = f"the checks ran past {RUN_DEADLINE} s"
    finally:
        collect_journal(results)
    return 0 if all(c["ok"] for c in results.doc["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
