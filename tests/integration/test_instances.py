"""Several hmmd instances on one host: one owner per process, MOVED, and a group that follows.

Two real hmmds whose ipc sockets share a directory share its ``hmmd-owners``
claims (SPEC §1.7): the first to watch a process owns it, the other answers
``MOVED`` with the owner's endpoint to ``register`` and ``sync_range``, and an
agent older than 1.3 gets ``PERMISSION_DENIED`` naming it. A ``SessionGroup``
follows MOVED to the owner. A killed owner frees its claims; a target's
userfaultfd offer claims its process for the hmmd it was offered to, and a target
given every hmmd offers and announces to the one that watches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import mmap
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hmmirror.client import DaemonUnavailable, Moved, SessionGroup, connect, connect_group, target
from hmmirror.client.session import status
from hmmirror.proto import decode, encode
from hmmirror.proto import messages as M
from hmmirror.proto.errors import ErrorCode
from hmmirror.testing.hmmd import HmmdProcess, launch_hmmd
from hmmirror.testing.puppet import Puppet, PuppetError
from hmmirror.testing.rdma import HM_AGENT, hm_agent
from hmmirror.transport import dial

PAGE = 4096
DEADLINE = 15.0


@contextlib.contextmanager
def instances(count: int = 2, extra: tuple[str, ...] = ()) -> Iterator[list[HmmdProcess]]:
    """``count`` hmmds with their sockets in one fresh directory; stopped afterwards."""
    directory = tempfile.mkdtemp(prefix="hmmi-", dir="/tmp")
    started: list[HmmdProcess] = []
    try:
        for n in range(count):
            endpoint = f"ipc://{directory}/hmmd-{n}.sock"
            args = ["--ack-deadline", "1s", "--heartbeat", "200ms", *extra]
            log = os.path.join(directory, f"hmmd-{n}.stderr")
            started.append(launch_hmmd(endpoint, args, log_path=log, pdeathsig=True))
        for hmmd in started:
            hmmd.wait_ready(DEADLINE)
        yield started
    finally:
        for hmmd in started:
            hmmd.stop()  # also closes its stdout pipe, if a test killed it
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def mapped(puppet: Any, npages: int = 4) -> AsyncIterator[int]:
    """An anonymous mapping of the puppet, written so that every page is present."""
    addr = await puppet.mmap(npages * PAGE)
    await puppet.write(addr, os.urandom(npages * PAGE))
    yield addr


async def test_the_second_hmmd_answers_moved_naming_the_first(puppet):
    with instances() as (first, second):
        async with mapped(puppet) as addr:
            async with connect(first.endpoint) as a, connect(second.endpoint) as b:
                await a.mirror(puppet.pid, addr, 4 * PAGE)
                with pytest.raises(Moved) as moved:
                    await b.mirror(puppet.pid, addr, 4 * PAGE)
                assert moved.value.owner == first.endpoint
                assert moved.value.code == ErrorCode.MOVED
                # Its mirrors are the first's: OK from the second would leave them unsynced.
                with pytest.raises(Moved) as moved:
                    await b.sync_range(puppet.pid, addr, addr + PAGE)
                assert moved.value.owner == first.endpoint
                await a.sync_range(puppet.pid, addr, addr + PAGE)  # the owner serves it
                figures = [await status(h.endpoint) for h in (first, second)]
                assert (figures[0]["claims"], figures[1]["claims"]) == (1, 0)
                assert (figures[0]["moved"], figures[1]["moved"]) == (0, 2)
            # The last mirror gone, the claim is given back: the second may watch it now.
            async with connect(second.endpoint) as b:
                await b.mirror(puppet.pid, addr, PAGE)
                assert (await b.status())["claims"] == 1


async def test_a_group_follows_moved_to_the_owner_and_syncs_its_mirrors(puppet):
    with instances() as hmmds:
        async with mapped(puppet) as addr:
            owner = hmmds[(puppet.pid + 1) % 2]  # not the one the pid picks in the group
            async with connect(owner.endpoint) as first:
                seen = await first.mirror(puppet.pid, addr, 4 * PAGE)
                await seen.fault(addr, 4)
                async with connect_group([h.endpoint for h in hmmds]) as group:
                    assert isinstance(group, SessionGroup)
                    assert group.session_for(puppet.pid).endpoint != owner.endpoint
                    mirror = await group.mirror(puppet.pid, addr, 4 * PAGE)
                    assert mirror.session.endpoint == owner.endpoint
                    assert group.moves == 1
                    assert group.session_for(puppet.pid).endpoint == owner.endpoint
                    await group.sync_range(puppet.pid, addr, addr + 2 * PAGE)
                    assert group.moves == 1  # remembered: no second MOVED
                # The sync reached the owner's mirrors: the first session's was invalidated.
                assert any(lo <= addr < hi for lo, hi, _ in seen.events)


async def test_a_group_given_no_owner_raises_moved(puppet):
    with instances() as (first, second):
        async with mapped(puppet) as addr, connect(first.endpoint) as a:
            await a.mirror(puppet.pid, addr, PAGE)
            async with connect_group([second.endpoint]) as group:
                with pytest.raises(Moved) as moved:
                    await group.mirror(puppet.pid, addr, PAGE)
    assert moved.value.owner == first.endpoint


def _old_agent_register(endpoint: str, pid: int, addr: int) -> M.Message:
    """A protocol 1.0 agent's hello and register (raw DEALER); the answer to register."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = dial(ctx, endpoint, None, timeout=5.0)
    try:
        for n, msg in enumerate(
            (
                M.Hello(agent="old"),
                M.Register(pid=pid, start_time=0, intervals=((addr, addr + PAGE),), access=1),
            ),
            1,
        ):
            frames = encode(msg, n)
            header = msgpack.unpackb(frames[1])
            header["v"] = [1, 0]
            frames[1] = msgpack.packb(header)
            sock.send_multipart(frames)
            while True:
                assert sock.poll(int(DEADLINE * 1000)), f"no answer to {msg.TYPE}"
                env = decode(sock.recv_multipart())
                if env.re == n:
                    break
        return env.msg
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_an_agent_older_than_1_3_is_refused_with_the_owner_in_the_message(puppet):
    with instances() as (first, second):
        async with mapped(puppet) as addr, connect(first.endpoint) as a:
            await a.mirror(puppet.pid, addr, PAGE)
            answer = _old_agent_register(second.endpoint, puppet.pid, addr)
    assert isinstance(answer, M.Error)
    assert answer.code == ErrorCode.PERMISSION_DENIED
    assert first.endpoint in answer.message and answer.owner == ""


async def test_a_killed_owner_frees_its_processes(puppet):
    with instances() as (first, second):
        async with mapped(puppet) as addr, connect(first.endpoint, timeout=2.0) as a:
            await a.mirror(puppet.pid, addr, PAGE)
            first.kill(signal.SIGKILL)
            first.wait(DEADLINE)
            async with connect(second.endpoint) as b:
                mirror = await b.mirror(puppet.pid, addr, PAGE)
                assert await mirror.fault(addr, 1) >= 0
                assert (await b.status())["claims"] == 1


async def test_a_uffd_offer_claims_its_process_for_the_hmmd_it_went_to(puppet):
    with instances() as (first, second):
        async with mapped(puppet) as addr:
            await puppet.expose(first.endpoint)
            async with connect(second.endpoint) as b:
                with pytest.raises(Moved) as moved:
                    await b.mirror(puppet.pid, addr, PAGE)
            assert moved.value.owner == first.endpoint
            async with connect(first.endpoint) as a:
                await a.mirror(puppet.pid, addr, PAGE)
                figures = await a.status()
            # The mirror gone, so is the claim (the offer's went when the mm took the uffd).
            after = await status(first.endpoint)
    assert figures["uffd_watched"] == 1  # the offered uffd, taken by its owner
    assert (figures["claims"], after["claims"]) == (1, 0)


async def test_a_target_given_every_hmmd_announces_and_offers_to_the_one_that_watches_it(puppet):
    """A target given the host's hmmds (a list, as HMMIRROR_ENDPOINT takes it) speaks to its
    pid's pick, and, once another one watches it, to the one a MOVED refusal names: its
    ``BlockingAnnouncer`` sync reaches the owner's mirrors and ``expose`` hands the owner its
    userfaultfd. Given only the other one, it is told (MOVED), never sent elsewhere."""
    with instances() as hmmds:
        owner, other = hmmds[(puppet.pid + 1) % 2], hmmds[puppet.pid % 2]  # the pick: other
        both = ",".join(h.endpoint for h in hmmds)
        async with mapped(puppet) as addr, connect(owner.endpoint) as agent:
            seen = await agent.mirror(puppet.pid, addr, 4 * PAGE)
            await seen.fault(addr, 4)
            assert await puppet.announce(both, addr, PAGE) == owner.endpoint
            assert any(lo <= addr < hi for lo, hi, _ in seen.events), seen.events
            await puppet.expose(both)
            assert (await agent.status())["uffd_watched"] == 1  # the owner took it
            refused = (PuppetError, OSError)  # the puppet's report of what its call raised
            with pytest.raises(refused, match=r"watched by another hmmd") as told:
                await puppet.announce(other.endpoint, addr, PAGE)
            assert owner.endpoint in str(told.value)
            with pytest.raises(refused, match=f"moved: {owner.endpoint}"):
                await puppet.expose(other.endpoint, strict=True)
            assert (await status(other.endpoint))["claims"] == 0


async def test_an_asyncio_announcer_given_every_hmmd_follows_moved_to_the_owner():
    """``hmmirror.client.target.connect`` with several endpoints announces through a group:
    this test process announces a change of its own memory, mirrored at the hmmd its pid
    does not pick."""
    with instances() as hmmds:
        owner = hmmds[(os.getpid() + 1) % 2]
        own = mmap.mmap(-1, 4 * PAGE)
        own.write(os.urandom(4 * PAGE))
        addr = ctypes.addressof(ctypes.c_char.from_buffer(own))
        try:
            async with connect(owner.endpoint) as agent:
                seen = await agent.mirror(os.getpid(), addr, 4 * PAGE)
                await seen.fault(addr, 4)
                async with target.connect([h.endpoint for h in hmmds]) as me:
                    async with me.invalidating(addr, addr + PAGE, M.Event.UNMAP):
                        assert any(lo <= addr < hi for lo, hi, _ in seen.events)
                    assert isinstance(me.session, SessionGroup) and me.session.moves == 1
        finally:
            del addr
            with contextlib.suppress(BufferError):
                own.close()


async def test_instances_whose_sockets_are_apart_share_claims_through_owners_dir(puppet):
    """owners_dir set to one directory: hmmds whose sockets are apart still share claims."""
    shared = tempfile.mkdtemp(prefix="hmmo-", dir="/tmp")
    try:
        owners = os.path.join(shared, "owners")
        with (
            instances(1, ("--owners-dir", owners)) as (first,),
            instances(1, ("--owners-dir", owners)) as (second,),
        ):
            async with (
                mapped(puppet) as addr,
                connect(first.endpoint) as a,
                connect(second.endpoint) as b,
            ):
                await a.mirror(puppet.pid, addr, PAGE)
                with pytest.raises(Moved):
                    await b.mirror(puppet.pid, addr, PAGE)
        assert stat.S_IMODE(os.stat(owners).st_mode) == 0o700
        assert os.listdir(owners) == []  # every claim given back at shutdown
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("how", ["group-writable", "another user's", "a symbolic link"])
def test_an_owners_directory_others_could_write_is_refused_at_start(how):
    """Configured or default (beside the socket), a directory others could write, or a
    symbolic link where it should be, stops hmmd at once with one line and exit 2 (a
    deployment error, which systemd does not restart)."""
    if how == "another user's" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    directory = tempfile.mkdtemp(prefix="hmmo-", dir="/tmp")
    try:
        owners = os.path.join(directory, "hmmd-owners")  # the default, beside the socket
        args = []
        if how == "group-writable":
            os.mkdir(owners)
            os.chmod(owners, 0o770)
            args = ["--owners-dir", owners]
        elif how == "another user's":
            os.mkdir(owners, 0o700)
            os.chown(owners, 65534, 65534)
        else:
            os.mkdir(os.path.join(directory, "elsewhere"), 0o700)
            os.symlink(os.path.join(directory, "elsewhere"), owners)
        run = subprocess.run(
            [sys.executable, "-m", "hmmirror.daemon", "run", "--endpoint",
             f"ipc://{directory}/hmmd.sock", *args],
            capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"hmmd: owners directory {owners}"), last
    assert "Traceback" not in run.stderr


class Endpoints:
    """What ``hm_agent`` needs of hmmd: here every instance's endpoint, comma-separated."""

    def __init__(self, hmmds: list[HmmdProcess]) -> None:
        self.endpoint = ",".join(h.endpoint for h in hmmds)


async def test_hm_agent_registers_each_mr_with_the_hmmd_that_watches_its_process(puppet):
    """Two targets, each owned by the instance its pid does not pick: hm-agent, given both
    endpoints, follows MOVED for each MR and serves READs of both with the targets' bytes."""
    async with Puppet.spawn(timeout=DEADLINE) as other:
        with instances() as hmmds:
            data, specs, owners = {}, [], {}
            async with contextlib.AsyncExitStack() as stack:
                for target in (puppet, other):
                    addr = await target.mmap(4 * PAGE)
                    data[target.pid] = (addr, os.urandom(4 * PAGE))
                    await target.write(addr, data[target.pid][1])
                    owner = hmmds[(target.pid + 1) % 2]  # not the pid's pick
                    owners[target.pid] = owner.endpoint
                    session = await stack.enter_async_context(connect(owner.endpoint))
                    await session.mirror(target.pid, addr, 4 * PAGE)
                    specs.append(f"{target.pid}:{addr:#x}:{4 * PAGE}:rw")
                async with hm_agent(Endpoints(hmmds), *specs) as agent, agent.peer() as peer:
                    for rkey, target in zip(agent.rkeys, (puppet, other), strict=True):
                        addr, expected = data[target.pid]
                        assert bytes(await peer.read(rkey, addr, 4 * PAGE)) == expected
                        assert bytes(await peer.read(rkey, addr + 5, 100)) == expected[5:105]
                    mirrors = {h.endpoint: (await status(h.endpoint))["mirrors"] for h in hmmds}
    # Each instance holds its targets' mirrors, two each (the test's session's, hm-agent's).
    expected = {h.endpoint: 2 * list(owners.values()).count(h.endpoint) for h in hmmds}
    assert mirrors == expected


def test_hm_agent_refuses_the_same_hmmd_twice():
    run = subprocess.run(
        [*HM_AGENT, "--daemon", "ipc:///tmp/a.sock,ipc:///tmp/a.sock", "check-config"],
        capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "hm-agent: configuration error: daemon: at most 16 different hmmd endpoints, "
        "got 'ipc:///tmp/a.sock,ipc:///tmp/a.sock'"
    ]


def _serve_briefly(args: list[str], env: dict[str, str]) -> tuple[int | None, str]:
    """hmmd run with ``args``: its exit status if it exited within the deadline (else None,
    once it said it is ready, after which it is stopped), and its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hmmirror.daemon", "run", *args], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = ""
        if select.select([proc.stdout], [], [], DEADLINE)[0]:  # bounded: never a hang
            ready = proc.stdout.readline()  # the ready line, or "" once it exited
        if ready:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return (None if ready else proc.returncode), err


def test_a_default_owners_directory_that_cannot_be_made_leaves_hmmd_claiming_nothing():
    """A tcp:// hmmd's default owners directory is in its runtime directory, which a user's
    hmmd may not be able to make: it serves as before claims existed, and warns. A directory
    it was told to use stops it with one line."""
    runtime = "/proc/hmmirror-none"  # nothing can be made under /proc, even by root
    tcp = ["--endpoint", "tcp://127.0.0.1:0", "--insecure"]
    rc, err = _serve_briefly(tcp, {"RUNTIME_DIRECTORY": runtime})
    assert rc is None, err
    assert f"owners directory {runtime}/hmmd-owners:" in err and "claims no process" in err
    with tempfile.TemporaryDirectory(prefix="hmmo-", dir="/tmp") as own:  # its own intake
        rc, err = _serve_briefly(
            [*tcp, "--owners-dir", f"{runtime}/owners"], {"RUNTIME_DIRECTORY": own}
        )
    assert rc == 2, err
    assert err.strip().splitlines()[-1].startswith(f"hmmd: owners directory {runtime}/owners:")
    assert "Traceback" not in err


# --- an hmmd that does not answer when the group opens ---------------------------------------


@contextlib.contextmanager
def late_instance(beside: HmmdProcess, n: int) -> Iterator[HmmdProcess]:
    """Another hmmd in ``beside``'s directory (so sharing its claims), started now."""
    directory = os.path.dirname(beside.endpoint[len("ipc://") :])
    args = ["--ack-deadline", "1s", "--heartbeat", "200ms"]
    log = os.path.join(directory, f"hmmd-{n}.stderr")
    hmmd = launch_hmmd(f"ipc://{directory}/hmmd-{n}.sock", args, log_path=log, pdeathsig=True)
    try:
        hmmd.wait_ready(DEADLINE)
        yield hmmd
    finally:
        hmmd.stop()


async def test_a_group_opens_without_an_hmmd_that_does_not_answer_and_the_others_serve(
    puppet, caplog
):
    """Whatever the pid picks, a process nobody watches is served by a member that answers;
    a group none of whose hmmds answers is DaemonUnavailable."""
    with instances(1) as (live,):
        gone = live.endpoint.replace("hmmd-0.sock", "hmmd-1.sock")  # nothing listens there
        async with mapped(puppet) as addr:
            for order in ([live.endpoint, gone], [gone, live.endpoint]):
                async with connect_group(order, timeout=2.0) as group:
                    assert [s.endpoint for s in group.sessions] == [live.endpoint]
                    assert group.absent == [gone]
                    mirror = await group.mirror(puppet.pid, addr, 4 * PAGE)
                    assert mirror.session.endpoint == live.endpoint
                    assert bytes((await mirror.read(addr, 1)).data) == await puppet.read(addr, PAGE)
            said = [r for r in caplog.records if r.levelname == "WARNING" and gone in r.message]
            assert len(said) == 2, caplog.text  # once per group opened
        with pytest.raises(DaemonUnavailable):
            async with connect_group([gone, gone.replace("-1.", "-2.")], timeout=2.0):
                pass


async def test_a_group_opens_a_member_that_answers_late_when_moved_names_it(puppet):
    """The owner started after the group opened: the member that answers says MOVED, naming
    it, and the group opens it then, and keeps it."""
    with instances(1) as (first,):
        later = first.endpoint.replace("hmmd-0.sock", "hmmd-1.sock")
        async with mapped(puppet) as addr, connect_group([first.endpoint, later]) as group:
            assert group.absent == [later]
            joined = []

            async def on_join(session: Any) -> None:
                joined.append(session.endpoint)

            group.on_join = on_join
            with late_instance(first, 1) as owner:
                assert owner.endpoint == later
                async with connect(owner.endpoint) as session:
                    await session.mirror(puppet.pid, addr, 4 * PAGE)
                    mirror = await group.mirror(puppet.pid, addr, 4 * PAGE)
                    assert mirror.session.endpoint == later
                    assert group.absent == [] and joined == [later] and group.moves == 1
                    assert bytes((await mirror.read(addr, 1)).data) == await puppet.read(addr, PAGE)


async def test_an_owner_that_stopped_answering_costs_a_request_no_more_than_the_timeout(puppet):
    """The owner is alive (its claim holds) but stopped (SIGSTOP) when the group opens, and
    when the other member names it: the request fails with DaemonUnavailable naming it,
    within the group's timeout, and the owner stays absent."""
    with instances() as (first, owner):
        async with mapped(puppet) as addr, connect(owner.endpoint) as session:
            await session.mirror(puppet.pid, addr, 4 * PAGE)
            os.kill(owner.pid, signal.SIGSTOP)
            try:
                async with connect_group([first.endpoint, owner.endpoint], timeout=1.0) as group:
                    assert group.absent == [owner.endpoint]
                    loop = asyncio.get_running_loop()
                    began = loop.time()
                    with pytest.raises(DaemonUnavailable) as unavailable:
                        await group.mirror(puppet.pid, addr, 4 * PAGE)
                    assert loop.time() - began < 5.0
                    assert f"hmmd at {owner.endpoint} watches pid {puppet.pid}" in str(
                        unavailable.value
                    )
                    assert group.absent == [owner.endpoint]
            finally:
                os.kill(owner.pid, signal.SIGCONT)


async def test_hm_agent_starts_and_serves_while_one_of_its_hmmds_does_not_answer(puppet):
    """hm-agent given two endpoints, one with nothing behind it: it warns once, naming it,
    and serves the MR through the hmmd that answers."""
    with instances(1) as (live,):
        gone = live.endpoint.replace("hmmd-0.sock", "hmmd-1.sock")
        async with mapped(puppet) as addr:
            expected = await puppet.read(addr, 4 * PAGE)

            class Both:
                endpoint = f"{gone},{live.endpoint}"

            spec = f"{puppet.pid}:{addr:#x}:{4 * PAGE}:r"
            async with hm_agent(Both(), spec) as agent, agent.peer() as peer:
                assert bytes(await peer.read(agent.rkeys[0], addr, 4 * PAGE)) == expected
                assert (await status(live.endpoint))["mirrors"] == 1
    warned = [line for line in agent.errors.decode().splitlines() if " warning " in line]
    assert len(warned) == 1 and gone in warned[0], agent.errors.decode()[-2000:]


async def test_a_group_cancelled_while_it_opens_leaves_no_session_behind(puppet):
    """Cancelled while one member is still opening (a stopped hmmd, which never answers):
    the session the other member opened is closed, not left with its heartbeats."""
    with instances() as (live, stopped):
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            opening = connect_group([live.endpoint, stopped.endpoint], timeout=30.0)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    async with opening:
                        pytest.fail("the group opened with a stopped member and a 30 s timeout")
            loop = asyncio.get_running_loop()
            until = loop.time() + DEADLINE
            while (await status(live.endpoint))["sessions"] and loop.time() < until:
                await asyncio.sleep(0.05)
            assert (await status(live.endpoint))["sessions"] == 0
        finally:
            os.kill(stopped.pid, signal.SIGCONT)


async def test_hmmctl_reads_several_hmmds_and_says_which_did_not_answer(puppet):
    """``--endpoint A,B`` (or HMMIRROR_ENDPOINT, as hm-agent takes it): status shows each
    hmmd in turn (``-j``: an object per line), mms and mirrors one table with an HMMD
    column; one that does not answer is one line and exit 1, the others still shown. top
    and trace read one hmmd: two are a usage error (below)."""

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        # In a thread: the test's own session heartbeats on this loop, and its lease is
        # 0.6 s, less than hmmctl takes to start on a loaded machine.
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "hmmirror.tools.ctlapp", *args],
            capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    with instances() as (first, second):
        both = f"{first.endpoint},{second.endpoint}"
        shown = await run("--endpoint", both, "status")
        assert shown.returncode == 0, shown.stderr
        assert [line for line in shown.stdout.splitlines() if line.startswith("==")] == [
            f"== hmmd at {first.endpoint}",
            f"== hmmd at {second.endpoint}",
        ]
        lines = (await run("-j", "--endpoint", both, "status")).stdout.splitlines()
        assert [json.loads(line)["endpoint"] for line in lines] == [first.endpoint, second.endpoint]
        async with mapped(puppet) as addr, connect(second.endpoint) as session:
            await session.mirror(puppet.pid, addr, 4 * PAGE)
            listed = await run("-j", "--endpoint", both, "mms")
            rows = [json.loads(r) for r in listed.stdout.splitlines()]
            assert [(r["pid"], r["endpoint"]) for r in rows] == [(puppet.pid, second.endpoint)]
            gone = first.endpoint.replace("hmmd-0.sock", "hmmd-9.sock")
            table = await run("--endpoint", f"{gone},{both}", "mirrors")
            assert table.returncode == 1
            assert table.stderr.strip().splitlines() == [
                f"hmmctl: cannot connect to hmmd at {gone}: no such socket (is the server running?)"
            ]
            head, row = table.stdout.splitlines()
            assert head.split()[-1] == "HMMD" and row.split()[-1] == second.endpoint


async def test_top_and_trace_read_one_hmmd():
    for command in ("top", "trace"):
        done = subprocess.run(
            [sys.executable, "-m", "hmmirror.tools.ctlapp", "--endpoint",
             "ipc:///tmp/a.sock,ipc:///tmp/b.sock", command],
            capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.strip() == (
            f"hmmctl: {command} reads one hmmd, and --endpoint names 2: give one "
            "(status, mms, mirrors read several)"
        )
