"""An agent run as another user: ``python as_user.py ENDPOINT STEPS_JSON`` prints one JSON line.

The attack tests start it with ``User.run`` (setpriv), so every request reaches hmmd
with that user's SO_PEERCRED. Each step is a dict with an ``op``; its outcome is
``{"ok": true, "value": ...}`` or ``{"ok": false, "code": "PERMISSION_DENIED", ...}``:

- ``status`` / ``inventory``: without a session (what ``hmmctl`` sends);
- ``session_status`` / ``session_inventory``: through the session;
- ``read``: mirror ``pid`` at ``addr`` read-only and read one page through it;
- ``write``: mirror ``pid`` at ``addr`` read-write and write one page of ``byte``;
- ``sync``: ``sync_range`` one page of ``pid`` at ``addr``;
- ``own``: mirror a page of this very process, write it through the mirror, and say
  whether the bytes landed (the one thing a user may always do);
- ``own_sync``: ``sync_range`` a page of this process.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import mmap
import os
import sys
from typing import Any

from hmmirror.client import Access, AgentError, RemoteError, connect
from hmmirror.client.session import inventory, status
from hmmirror.proto import ErrorCode
from hmmirror.proto.messages import Inventory, InventoryReply

PAGE = 4096


def _error(exc: AgentError) -> dict[str, Any]:
    """A refusal (or another failure: code ``AgentError`` class name) as JSON."""
    if isinstance(exc, RemoteError):
        return {"ok": False, "code": ErrorCode(exc.code).name, "message": exc.message}
    return {"ok": False, "code": type(exc).__name__, "message": str(exc)}


async def _step(session: Any, endpoint: str, step: dict[str, Any], mine: mmap.mmap) -> Any:
    """Run one step; its value (a RemoteError propagates)."""
    op = step["op"]
    if op == "status":
        return await status(endpoint)
    if op == "session_status":
        return await session.status()
    if op == "inventory":
        mms, mirrors = await inventory(endpoint)
        return {"mms": mms, "mirrors": mirrors}
    if op == "session_inventory":
        env = await session.request(Inventory(), expect=InventoryReply)
        msg = env.msg
        return {"mms": list(msg.mms), "mirrors": list(msg.mirrors), "sessions": msg.sessions}
    if op == "read":
        mirror = await session.mirror(step["pid"], step["addr"], PAGE, Access.READ)
        return (await mirror.read(step["addr"], 1)).data[:16].hex()
    if op == "write":
        mirror = await session.mirror(step["pid"], step["addr"], PAGE, Access.READ | Access.WRITE)
        await mirror.write(step["addr"], bytes([step["byte"]]) * PAGE)
        return "written"
    if op == "sync":
        await session.sync_range(step["pid"], step["addr"], step["addr"] + PAGE)
        return "synced"
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mine))
    if op == "own":
        mirror = await session.mirror(os.getpid(), addr, PAGE, Access.READ | Access.WRITE)
        await mirror.write(addr, b"\x5a" * PAGE)
        return {"pid": os.getpid(), "landed": mine[:PAGE] == b"\x5a" * PAGE}
    if op == "own_sync":
        await session.sync_range(os.getpid(), addr, addr + PAGE)
        return "synced"
    raise ValueError(f"unknown step {op!r}")


async def main(endpoint: str, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run every step in one session; one outcome per step."""
    mine = mmap.mmap(-1, PAGE)
    mine[:PAGE] = b"\0" * PAGE
    results: list[dict[str, Any]] = []
    async with connect(endpoint, name=f"user-{os.getuid()}") as session:
        for step in steps:
            try:
                results.append({"ok": True, "value": await _step(session, endpoint, step, mine)})
            except AgentError as exc:
                results.append(_error(exc))
    return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))), flush=True)
