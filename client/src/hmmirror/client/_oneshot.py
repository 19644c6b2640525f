"""One-shot requests that need no session: ``status`` and ``inventory`` (what hmmctl shows).

Each opens a connection to hmmd, asks one question, and closes it; no HELLO,
no heartbeats, no mirrors.
"""

from __future__ import annotations

from hmmirror.client.channel import Channel, R
from hmmirror.client.curve import CurveKeys
from hmmirror.client.errors import DaemonUnavailable, RequestTimeout
from hmmirror.proto.messages import (
    MIRROR_COLUMNS,
    MM_COLUMNS,
    Inventory,
    InventoryReply,
    Message,
    Status,
    StatusReply,
)


class _Question(Channel):
    """A connection to hmmd for one question."""

    what = "hmmd"


async def ask(
    endpoint: str,
    msg: Message,
    expect: type[R],
    timeout: float = 2.0,
    curve: CurveKeys | None = None,
) -> R:
    """One request that needs no session (``status``, ``inventory``); its reply."""
    if curve is None and endpoint.startswith("tcp://"):
        curve = CurveKeys.from_env()
    channel = _Question(endpoint, timeout, curve)
    try:
        return await channel.call(msg, expect)
    except RequestTimeout as exc:
        raise DaemonUnavailable(f"no answer from hmmd at {endpoint} in {timeout:g} s") from exc
    finally:
        channel._close_socket()


async def status(
    endpoint: str, timeout: float = 2.0, curve: CurveKeys | None = None
) -> dict[str, int | float | str]:
    """The daemon's figures (what ``hmmctl status`` shows)."""
    reply = await ask(endpoint, Status(), StatusReply, timeout, curve)
    return dict(reply.stats)


async def inventory(
    endpoint: str, timeout: float = 2.0, curve: CurveKeys | None = None
) -> tuple[list[dict[str, int]], list[dict[str, int | str]]]:
    """The daemon's mms and mirrors, one dict per row (``hmmctl mms`` / ``mirrors``)."""
    msg = await ask(endpoint, Inventory(), InventoryReply, timeout, curve)
    mms = [dict(zip(MM_COLUMNS, row, strict=True)) for row in _rows(msg.mms, len(MM_COLUMNS))]
    mirrors: list[dict[str, int | str]] = []
    for row in _rows(msg.mirrors, len(MIRROR_COLUMNS)):
        entry: dict[str, int | str] = dict(zip(MIRROR_COLUMNS, row, strict=True))
        entry["agent"] = str(msg.sessions.get(str(entry["session"]), "?"))
        mirrors.append(entry)
    return mms, mirrors


def _rows(flat: tuple[int, ...], width: int) -> list[tuple[int, ...]]:
    """Split a flattened table into rows of ``width``."""
    return [flat[i : i + width] for i in range(0, len(flat) - width + 1, width)]
