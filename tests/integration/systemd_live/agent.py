"""An agent for the live-systemd checks, run as a real user inside the container.

``python agent.py ENDPOINT NAME`` opens a session with hmmd (``hmmirror.client.connect``) and
answers one JSON command per stdin line with one JSON line on stdout, until ``exit`` or EOF:

- ``{"op": "mirror", "pid", "addr", "length", "write": bool, "watch_writes": bool}`` →
  ``{"ok": true, "mirror": id}`` or ``{"ok": false, "code": "PERMISSION_DENIED", "error": ...}``
- ``{"op": "fault", "mirror", "addr", "npages"}``
- ``{"op": "read", "mirror", "addr", "npages"}`` → ``{"ok": true, "data": hex}``
- ``{"op": "write", "mirror", "addr", "data": hex}`` (whole pages)
- ``{"op": "events", "mirror", "n", "timeout"}``: wait until the mirror has ``n`` invalidation
  events (or the timeout) → ``{"ok": true, "events": [[start, end, "UNMAP"], ...], "waited"}``
- ``{"op": "status"}`` → hmmd's counters

Only the public library is used. Every request has the session's deadline.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from hmmirror.client import Access, AgentError, Mirror, Session, connect


async def serve(session: Session) -> None:
    """Answer commands from stdin until ``exit`` or EOF."""
    loop = asyncio.get_running_loop()
    mirrors: dict[int, Mirror] = {}
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip():
            return
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            return
        try:
            answer = await handle(session, mirrors, cmd)
        except AgentError as exc:
            code = getattr(exc, "code", None)
            answer = {"ok": False, "code": getattr(code, "name", str(code)), "error": str(exc)}
        print(json.dumps(answer), flush=True)


async def handle(session: Session, mirrors: dict[int, Mirror], cmd: dict[str, Any]) -> Any:
    """One command's answer (AgentError propagates to the caller)."""
    op = cmd["op"]
    if op == "mirror":
        access = Access.READ | (Access.WRITE if cmd.get("write") else Access(0))
        m = await session.mirror(
            cmd["pid"],
            cmd["addr"],
            cmd["length"],
            access,
            watch_writes=cmd.get("watch_writes", False),
        )
        mirrors[m.id] = m
        return {"ok": True, "mirror": m.id}
    if op == "status":
        return {"ok": True, "status": await session.status()}
    m = mirrors[cmd["mirror"]]
    if op == "fault":
        await m.fault(cmd["addr"], cmd["npages"])
        return {"ok": True}
    if op == "read":
        r = await m.read(cmd["addr"], cmd["npages"])
        return {"ok": True, "data": bytes(r.data).hex(), "cpages": r.cpages}
    if op == "write":
        w = await m.write(cmd["addr"], bytes.fromhex(cmd["data"]))
        return {"ok": True, "cpages": w.cpages}
    if op == "events":
        t0 = time.monotonic()
        while len(m.events) < cmd["n"] and time.monotonic() - t0 < cmd["timeout"]:
            await asyncio.sleep(0.005)
        events = [[s, e, ev.name] for s, e, ev in m.events]
        return {"ok": True, "events": events, "waited": round(time.monotonic() - t0, 3)}
    raise ValueError(f"unknown op {op!r}")


async def main(endpoint: str, name: str) -> None:
    """Connect, say so, serve."""
    try:
        async with connect(endpoint, name=name, timeout=10.0) as session:
            print(json.dumps({"ok": True, "ready": name}), flush=True)
            await serve(session)
    except AgentError as exc:
        print(json.dumps({"ok": False, "error": f"session: {exc}"}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
