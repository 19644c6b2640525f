"""A real hmmirror transport server that checks every message it gets is whole.

Run by ``test_frame_splice``: it serves ``argv[1]`` (``ipc://PATH``) with
``hmmirror.transport.Server``, prints ``ready``, and, when its stdin closes,
prints one JSON line: how many messages it got and how many were not whole.

Each peer sends messages whose frames all read ``TAG:SEQ:N``: the same TAG
(the peer's own) and SEQ in every frame, and N frames. A message with frames
of two messages, or of two peers, is counted as spliced.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence

import zmq
from hmmirror.transport import Connection, Server


def main() -> None:
    endpoint = sys.argv[1]
    seen = {"messages": 0, "spliced": 0, "connections": 0}
    tags: dict[bytes, bytes] = {}
    examples: list[list[str]] = []

    def on_message(conn: Connection, frames: Sequence[zmq.Frame]) -> None:
        seen["messages"] += 1
        parts = [bytes(f.buffer).split(b":") for f in frames]
        first = parts[0]
        tag = tags.setdefault(conn.rid, first[0])
        whole = (
            len(first) == 3
            and first[0] == tag
            and first[2].isdigit()
            and int(first[2]) == len(parts)
            and all(p == first for p in parts)
        )
        if not whole:
            seen["spliced"] += 1
            if len(examples) < 5:
                examples.append([bytes(f.buffer)[:40].decode(errors="replace") for f in frames])

    async def serve() -> None:
        server = Server(endpoint, on_message, mode=0o600)
        server.start()
        loop = asyncio.get_running_loop()
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        seen["connections"] = len(tags)
        server.close()
        print(json.dumps({**seen, "examples": examples}), flush=True)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
