"""An agent's capabilities are those of the program that connected, not of one exec'd later.

hmmd learns who connected to its door from SO_PEERCRED (uid, gid and pid, recorded at
connect()), and reads that process's capabilities from /proc when the knock is read: an
agent holding CAP_SYS_PTRACE may mirror any process. A process may exec another program
after connecting: one with file capabilities keeps its uids, so the uid check passes, and
its capabilities would be lent to whoever holds the connection. The attack is real: a
second user connects to the door, leaves the connection with a child, and execs a copy of
``sleep`` given ``cap_sys_ptrace+ep``; the child then knocks on that connection and asks to
mirror a root process for writing. hmmd must not count capabilities a program gained when
it was exec'd (AT_SECURE in its auxv): the request is refused as for any user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hmmirror.testing.puppet import Puppet

PAGE = 4096

#: The attacker. argv: door path, the capable program, victim pid, victim address. The
#: parent connects to the door and execs the program; the child waits until the program
#: runs, knocks on the parent's connection with its own DEALER's socket file, then says
#: hello and registers the victim for writing; it prints hmmd's answer's type (or error).
ATTACK = r"""
import os, socket, sys, time
import zmq
from hmmirror.proto import decode, encode
from hmmirror.proto import messages as M
from hmmirror.transport.dial import Dialer
from hmmirror.transport.door import read_reply
door_path, program, victim, addr = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
door = socket.socket(socket.AF_UNIX)
door.connect(door_path)
parent = os.getpid()
if os.fork() != 0:
    os.execv(program, [program, "60"])  # the connection's SO_PEERCRED pid runs it now
deadline = time.monotonic() + 10
while "0000000000080000" not in open(f"/proc/{parent}/status").read():
    if time.monotonic() > deadline:
        sys.exit("the capable program never ran")
    time.sleep(0.01)
ctx = zmq.Context()
dialer = Dialer(ctx, "ipc://" + door_path)
fd = dialer._descriptor()
socket.send_fds(door, [b"channel\n"], [fd])
answer = read_reply(door).strip()
if answer != "ok":
    print("knock:", answer, flush=True)
    sys.exit(0)
sock = dialer.sock
def ask(msg, n):
    sock.send_multipart(encode(msg, n))
    while True:
        if not sock.poll(10000):
            return "no answer"
        env = decode(sock.recv_multipart())
        if env.re == n:
            if isinstance(env.msg, M.Error):
                return f"error {env.msg.code}: {env.msg.message}"
            return env.msg.TYPE
print("hello:", ask(M.Hello(agent="borrowed-caps", pid=os.getpid()), 1), flush=True)
register = M.Register(pid=victim, start_time=0, intervals=((addr, addr + 4096),), access=3)
print("register:", ask(register, 2), flush=True)
os.kill(parent, 9)
"""


@pytest.fixture
def capable_sleep() -> Iterator[str]:
    """A copy of sleep(1) with the file capability cap_sys_ptrace+ep, runnable by anyone."""
    setcap = shutil.which("setcap") or shutil.which("setcap", path="/usr/sbin:/sbin")
    if setcap is None:
        pytest.skip("setcap (libcap2-bin) is not installed: no file capability can be given")
    directory = tempfile.mkdtemp(prefix="hmcap-", dir="/tmp")  # /tmp: any user gets here
    try:
        os.chmod(directory, 0o755)
        program = os.path.join(directory, "capable-sleep")
        shutil.copy("/bin/sleep", program)
        os.chmod(program, 0o755)
        subprocess.run([setcap, "cap_sys_ptrace+ep", program], check=True)
        yield program
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_capabilities_of_a_program_exec_d_after_connecting_are_not_lent(
    hmmd: Any, hmmd_group: str, make_user: Any, puppet: Puppet, capable_sleep: str
) -> None:
    victim = await puppet.mmap(PAGE)
    mallory = make_user(groups=(hmmd_group,))
    door = hmmd.endpoint[len("ipc://") :]
    done = mallory.run(
        mallory.python(ATTACK, door, capable_sleep, str(puppet.pid), str(victim)), 60
    )
    print(f"\n{done.stdout.strip()}")
    assert "hello: welcome" in done.stdout, (done.stdout, done.stderr)
    assert "register: error" in done.stdout and "registered" not in done.stdout, done.stdout
    assert hmmd.proc.poll() is None


#: A plain agent: mirror the victim for writing and say how it went. argv: endpoint, pid, addr.
AGENT = r"""
import asyncio, sys
from hmmirror.client import Access, RemoteError, connect
async def main():
    async with connect(sys.argv[1], name="ambient") as s:
        try:
            await s.mirror(int(sys.argv[2]), int(sys.argv[3]), 4096, Access.READ | Access.WRITE)
        except RemoteError as exc:
            print("refused:", exc.message)
            return
        print("registered")
asyncio.run(main())
"""


async def test_an_agent_given_cap_sys_ptrace_as_an_ambient_capability_stays_privileged(
    hmmd: Any, hmmd_group: str, make_user: Any, puppet: Puppet
) -> None:
    """What systemd's AmbientCapabilities= gives is not gained at exec (AT_SECURE 0): such
    an agent may still mirror any process, a root one included."""
    victim = await puppet.mmap(PAGE)
    mallory = make_user(groups=(hmmd_group,))
    argv = [
        "setpriv", f"--reuid={mallory.uid}", f"--regid={mallory.gid}", "--init-groups",
        "--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace", "--",
        *mallory.python(AGENT, hmmd.endpoint, str(puppet.pid), str(victim)),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "registered", (done.stdout, done.stderr)
