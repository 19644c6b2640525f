"""Multi-node test rigs: hosts, an hmmd over CURVE in the first, agents and targets.

``Network(n, workdir)`` builds ``n`` hosts (``netns.Cluster``), makes CURVE keys,
and starts hmmd in host 1 on ``tcp://10.231.0.1``; ``net.agent(host, ...)``
starts a ``remote_agent`` in any host; ``RigTarget`` is a process whose memory the
agents mirror, changed on command. Everything has a deadline and everything
is removed on exit. The pytest plugin (``hmmirror.testing.plugin``) hands these
out as fixtures; hmmirror's own multi-node tests use them that way.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from hmmirror.client.curve import generate
from hmmirror.testing.hmmd import HmmdProcess, start_hmmd
from hmmirror.testing.netns import Cluster, Host

PAGE = 4096
#: Deadline of every wait for a process's answer, in seconds.
DEADLINE = 10.0


def read_json_line(proc: subprocess.Popen[bytes], timeout: float = DEADLINE) -> dict[str, Any]:
    """The next JSON line ``proc`` prints, within ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no answer from pid {proc.pid} within {timeout:g} s")
    raw = proc.stdout.readline()
    if not raw:
        raise EOFError(f"pid {proc.pid} exited (rc {proc.poll()})")
    answer: dict[str, Any] = json.loads(raw)
    return answer


class RemoteAgent:
    """A ``remote_agent`` process in some host, driven line by line."""

    def __init__(self, host: Host, proc: subprocess.Popen[bytes]) -> None:
        self.host = host
        self.proc = proc
        self.ready = read_json_line(proc)

    def ask(self, cmd: str, timeout: float = DEADLINE) -> dict[str, Any]:
        """Send one command; return its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return read_json_line(self.proc, timeout)

    def until(self, check: Any, what: str, deadline: float = DEADLINE) -> dict[str, Any]:
        """Poll ``state`` until ``check(state)``; raise AssertionError after ``deadline``."""
        end = time.monotonic() + deadline
        while True:
            state = self.ask("state")
            if check(state):
                return state
            if time.monotonic() > end:
                raise AssertionError(f"{what}: last state {state}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        """SIGSTOP, SIGCONT, SIGKILL... the agent."""
        self.host.kill(self.proc, sig)


_TARGET = textwrap.dedent(
    """
    import ctypes, json, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    n, fill = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
    addr = libc.mmap(None, n * 4096, 3, 0x22, -1, 0)
    ctypes.memmove(addr, fill * (n * 4096 // len(fill)), n * 4096)
    print(json.dumps({"addr": addr}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "write":
            data = bytes.fromhex(cmd[2])
            ctypes.memmove(addr + int(cmd[1]), data, len(data))
        elif cmd[0] == "dontneed":
            libc.madvise(ctypes.c_void_p(addr + int(cmd[1])), int(cmd[2]), 4)
        print(json.dumps({"done": cmd[0]}), flush=True)
    """
)


class RigTarget:
    """A process with ``npages`` of anonymous memory filled with ``fill``, changed on command."""

    def __init__(self, npages: int, fill: bytes = b"A", host: Host | None = None) -> None:
        self.npages = npages
        argv = [sys.executable, "-c", _TARGET, str(npages), fill.hex()]
        pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        self.proc = (
            host.spawn(argv, **pipes) if host is not None else subprocess.Popen(argv, **pipes)
        )
        self.addr: int = read_json_line(self.proc)["addr"]
        # Under ``ip netns exec`` the target is a child of ip's exec: the same process.
        self.pid = self.proc.pid

    def _do(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        read_json_line(self.proc)

    def write(self, offset: int, data: bytes) -> None:
        """CPU stores of ``data`` at ``addr + offset``."""
        self._do(f"write {offset} {data.hex()}")

    def dontneed(self, offset: int, length: int) -> None:
        """``madvise(MADV_DONTNEED)`` of [addr + offset, +length)."""
        self._do(f"dontneed {offset} {length}")

    def close(self) -> None:
        """End the process."""
        self.proc.kill()
        self.proc.wait(DEADLINE)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class Network:
    """``n`` hosts with hmmd in host 1 over CURVE; agents may be started in any host."""

    def __init__(self, n: int, workdir: Path, *, ack_deadline: str = "1s") -> None:
        self.workdir = workdir
        self.cluster = Cluster(n)
        self.ack_deadline = ack_deadline
        self.server_public, self.server_secret = generate(str(workdir / "server"), "hmmd")
        self.allow = workdir / "allow"
        self.allow.mkdir(exist_ok=True)
        self.hosts: list[Host] = []
        self.endpoint = ""
        self.daemon: HmmdProcess | None = None
        self.targets: list[RigTarget] = []

    def __enter__(self) -> Network:
        self.hosts = self.cluster.__enter__()
        try:
            self.start_daemon()
        except BaseException:
            self.cluster.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.__exit__()  # kills every process started in a host, targets included
        if self.daemon is not None:
            self.daemon.stop(DEADLINE)  # reaped already; joins its stdout thread, closes the pipe
        for target in self.targets:
            for pipe in (target.proc.stdin, target.proc.stdout):
                if pipe is not None:
                    pipe.close()

    def start_daemon(self, port: str = "0") -> None:
        """Start hmmd in host 1 (again, after ``kill_daemon``: same port, new epoch)."""
        host = self.hosts[0]
        # A tcp agent gets only what a grant gives it: every allowed key (the ZAP allow-list
        # is the harness's) may read and write the targets, root's processes in host 1.
        policy = self.workdir / "policy.toml"
        policy.write_text(
            '[[grant]]\nagents = ["any"]\nuids = [0]\ngids = [0]\nprivileged = true\n'
            'access = ["read", "write"]\n'
        )
        self.daemon = start_hmmd(
            f"tcp://{host.addr}:{port}",
            ["--curve-key", self.server_secret, "--curve-allow", str(self.allow),
             "--policy", str(policy), "--ack-deadline", self.ack_deadline, "--heartbeat", "200ms"],
            log_path=str(self.workdir / "hmmd.stderr"), append=True, deadline=DEADLINE,
            env={"HMMIRROR_EXPOSE_SOCKET": str(self.workdir / "uffd.sock"),
                 "PATH": "/usr/bin:/bin"},
            spawn=host.spawn,
        )  # fmt: skip
        self.endpoint = self.daemon.endpoint

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        """Signal hmmd; with SIGKILL, also wait until it is gone."""
        assert self.daemon is not None
        self.hosts[0].kill(self.daemon.proc, sig)
        if sig == signal.SIGKILL:
            self.daemon.stop(DEADLINE)  # reaped; its stdout pipe closed

    def restart_daemon(self) -> None:
        """Kill hmmd and start a new one on the same endpoint."""
        port = self.endpoint.rsplit(":", 1)[1]
        self.kill_daemon()
        self.start_daemon(port)

    def daemon_log(self) -> str:
        """What hmmd wrote to stderr so far."""
        return self.daemon.log() if self.daemon is not None else ""

    def target(self, npages: int = 1, fill: bytes = b"A") -> RigTarget:
        """A target process in host 1, next to hmmd (ended with the network)."""
        target = RigTarget(npages, fill, self.hosts[0])
        self.targets.append(target)
        return target

    def agent(self, host: Host, name: str, pid: int, addr: int, npages: int) -> RemoteAgent:
        """Start a remote agent ``name`` (its key allowed in) in ``host``, mirroring a range."""
        public, secret = generate(str(self.workdir / "agents" / name), name)
        (self.allow / f"{name}.key").write_bytes(Path(public).read_bytes())
        proc = host.spawn(
            [sys.executable, "-m", "hmmirror.testing.remote_agent", self.endpoint, str(pid),
             hex(addr), str(npages), "--server-key", self.server_public, "--client-key", secret,
             "--name", name, "--timeout", "2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return RemoteAgent(host, proc)
