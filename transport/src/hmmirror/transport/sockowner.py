"""Which local user owns a TCP socket of this host: one exact ``sock_diag`` lookup.

A TCP door knows a knock only by its source address, and every user of a host knocks from
the same ones (all of 127.0.0.0/8, and the host's own addresses). A knock that came from
this host (this network namespace) is made by a socket the kernel can name, with its
owner's uid: the door counts such knocks per user, as it counts ``ipc://`` ones, and lets
a user name only a port it listens on itself.

The kernel is asked through ``NETLINK_SOCK_DIAG`` for exactly one socket (an
``inet_diag_req_v2`` without ``NLM_F_DUMP``: ``inet_diag_find_one_icsk``, which looks the
4-tuple up as an arriving packet would, established sockets first, then listeners), so a
lookup costs the same however many sockets the host has; reading all of ``/proc/net/tcp``
per knock would let a flood of knocks, or of sockets, cost the door's loop dearly. A
client's rare check of who reached its port (``peers_at``) is a dump filtered by the
kernel.
Layouts: ``include/uapi/linux/inet_diag.h``, ``sock_diag.h``, ``netlink.h``.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterator

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
#: ``NLM_F_ROOT | NLM_F_MATCH``: every socket the request's filter accepts.
NLM_F_DUMP = 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
#: The request's attribute carrying a filter program, and the program's "source port
#: equals" op (``include/uapi/linux/inet_diag.h``).
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_EQ = 11
#: ``idiag_state`` of a listening socket (``TCP_LISTEN``).
LISTEN = 10
#: ``INET_DIAG_NOCOOKIE``: match the socket whatever its cookie.
NOCOOKIE = 0xFFFFFFFF
#: How long one lookup may take (the kernel answers at once; this is a bound, not a wait).
TIMEOUT_S = 0.5

_NLMSGHDR = struct.Struct("=IHHII")
#: ``inet_diag_req_v2`` up to its ``inet_diag_sockid``: family, protocol, ext, pad, states.
_REQ_HEAD = struct.Struct("=BBBxI")
#: ``inet_diag_sockid``'s ports (big-endian), then, after src[16] and dst[16]: if, cookie[2].
_PORTS = struct.Struct(">HH")
_TAIL = struct.Struct("=III")
#: ``inet_diag_bc_op`` (code, yes, no) and ``nlattr`` (length, type).
_BC_OP = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
#: A reply's datagram: a dump's come in at most 32 KiB (``netlink_dump``).
_DUMP_BUFFER = 65536
#: ``inet_diag_msg``: family, state, timer, retrans, the sockid (48 bytes), expires, rqueue,
#: wqueue, then uid at this offset, then inode.
_STATE_AT, _UID_AT, _MSG_SIZE = 1, 4 + 48 + 12, 4 + 48 + 20

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _host(text: str) -> Address:
    """An address as the door saw it, IPv4-mapped IPv6 taken as the IPv4 it maps."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _request(
    family: int,
    states: int,
    local: tuple[Address, int],
    remote: tuple[Address, int],
    ifindex: int = 0,
) -> bytes:
    """An ``inet_diag_req_v2`` for TCP sockets of ``family`` in ``states`` (a mask of
    ``1 << state``) at the 4-tuple ``local``, ``remote`` (an exact lookup's key)."""
    return b"".join((
        _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, states),
        _PORTS.pack(local[1], remote[1]),
        local[0].packed.ljust(16, b"\0"),
        remote[0].packed.ljust(16, b"\0"),
        _TAIL.pack(ifindex, NOCOOKIE, NOCOOKIE),
    ))  # fmt: skip


def _message(payload: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    """``payload`` as one ``SOCK_DIAG_BY_FAMILY`` netlink message."""
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), SOCK_DIAG_BY_FAMILY, flags, 1, 0)
    return header + payload


def _lookup(
    local: tuple[Address, int], remote: tuple[Address, int], ifindex: int = 0
) -> tuple[int, int, int] | None:
    """(state, uid, inode) of the TCP socket bound at ``local`` with peer ``remote`` (a
    listener: remote 0.0.0.0:0 or [::]:0), or None if this host has none. A socket its
    process has closed (``TIME_WAIT``, an orphaned ``FIN_WAIT2``) is a kernel minisock:
    inode 0 and uid 0, which say nothing of who made it. ``ifindex``: the device a socket
    bound to one (``SO_BINDTODEVICE``, a link-local scope) is matched on; 0 matches the
    others only."""
    family = socket.AF_INET if local[0].version == 4 else socket.AF_INET6
    if remote[0].version != local[0].version:
        return None
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(TIMEOUT_S)
        nl.sendto(_message(_request(family, 0xFFFFFFFF, local, remote, ifindex)), (0, 0))
        data = nl.recv(_DUMP_BUFFER)
    for kind, body in _messages(data):  # the first message is the answer
        if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MSG_SIZE:
            return None  # NLMSG_ERROR: -ENOENT, no such socket
        uid, inode = struct.unpack_from("=II", body, _UID_AT)
        return body[_STATE_AT], uid, inode
    return None


def _scope(address: tuple[object, ...]) -> int:
    """An IPv6 socket address's scope id (its interface, for a link-local one), else 0."""
    return int(address[3]) if len(address) >= 4 and isinstance(address[3], int) else 0


class LookupUnavailable(OSError):
    """The kernel could not be asked (no netlink here: a confined process): who made a
    socket cannot be told, as opposed to a socket that is not there."""


def knocker_uid(source: tuple[object, ...], door: tuple[object, ...]) -> int | None:
    """The uid owning the socket that connected from ``source`` to ``door`` (socket
    addresses as ``accept`` and ``getsockname`` give them), if that socket is on this host
    and still open (None: the knock came from elsewhere, or its socket was closed already,
    or the lookup failed; ``is_local`` tells the first from the others). A link-local
    source is looked for on its scope (its interface). A socket bound to a device
    otherwise (``SO_BINDTODEVICE``) is not found, and its knock is not served: trying each
    interface would let anyone make every knock cost one lookup per interface, on hosts
    with hundreds of them. LookupUnavailable if the kernel could not be asked."""
    try:
        local = (_host(str(source[0])), int(str(source[1])))
        remote = (_host(str(door[0])), int(str(door[1])))
    except ValueError:
        return None
    try:
        found = _lookup(local, remote, _scope(source))
    except OSError as exc:
        raise LookupUnavailable(f"sock_diag: {exc}") from exc
    if found is None or found[0] == LISTEN or found[2] == 0:
        return None
    return found[1]


def is_local(source: tuple[object, ...]) -> bool:
    """Whether the socket address ``source`` is one of this host's (this network namespace):
    loopback, or one a socket can bind (on its scope, for a link-local one)."""
    try:
        addr = _host(str(source[0]))
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    where: tuple[str, int] | tuple[str, int, int, int] = (str(addr), 0)
    if family == socket.AF_INET6:
        where = (str(addr), 0, 0, _scope(source))
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind(where)
    except OSError:
        return False
    return True


def listener_uids(host: str, port: int) -> set[int]:
    """The uid of the socket listening on ``port`` at ``host`` (or on every address; a
    ``%IFACE`` suffix names a link-local address's interface), as a set: empty when none
    listens there, or the lookup failed."""
    try:
        addr = _host(host)
        _, _, iface = host.partition("%")
        ifindex = (int(iface) if iface.isdigit() else socket.if_nametoindex(iface)) if iface else 0
        unspecified = ipaddress.ip_address("0.0.0.0" if addr.version == 4 else "::")
        found = _lookup((addr, port), (unspecified, 0), ifindex)
    except (OSError, ValueError):
        return set()
    return {found[1]} if found is not None and found[0] == LISTEN and found[2] else set()


def peers_at(host: str, port: int) -> list[tuple[str, int]]:
    """The far ends of the TCP connections, made or being made, that this host has at
    ``host``:``port`` (what a listener there accepted, or is accepting), of both families
    (an IPv4 connection to a dual-stack listener is an IPv6 socket, v4-mapped). Each is
    listed once: the kernel walks its tables in one pass (``_dump_at``). OSError if it
    cannot be asked, and the caller fails closed."""
    want = _host(host)
    return [
        (str(rhost), rport)
        for family in (socket.AF_INET, socket.AF_INET6)
        for lhost, rhost, rport in _dump_at(family, port)
        if lhost == want
    ]


def _dump_at(family: int, port: int) -> list[tuple[Address, Address, int]]:
    """(local host, remote host, remote port) of the TCP sockets of ``family`` at local
    ``port``, listeners left out, in this network namespace: none for IPv6 on a host
    without it.

    A ``NLM_F_DUMP`` with a bytecode filter (``INET_DIAG_BC_S_EQ``): the kernel puts only
    the sockets at ``port`` in the reply, so one message holds them all and the whole table
    is walked in one pass. Reading ``/proc/net/tcp`` instead is a walk resumed at each
    ``read``, and one resumed after other sockets came or went lists an entry twice, or
    misses one (``tests/unit/test_sockowner.py``)."""
    if family == socket.AF_INET6 and not os.path.exists("/proc/sys/net/ipv6"):
        return []  # booted with ipv6.disable=1: there is no IPv6 socket
    unspecified = ipaddress.ip_address("0.0.0.0" if family == socket.AF_INET else "::")
    # Two ops: "local port == PORT? then jump past the end (accept), else past it by
    # 4 more (reject)", the port carried in the second op (``inet_diag_bc_run``).
    bytecode = _BC_OP.pack(INET_DIAG_BC_S_EQ, 8, 12) + _BC_OP.pack(0, 0, port)
    attr = _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    ask = _request(family, ~(1 << LISTEN) & 0xFFFFFFFF, (unspecified, port), (unspecified, 0))
    rows: list[tuple[Address, Address, int]] = []
    deadline = time.monotonic() + TIMEOUT_S
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(TIMEOUT_S)
        nl.sendto(_message(ask + attr, NLM_F_REQUEST | NLM_F_DUMP), (0, 0))
        while time.monotonic() < deadline:
            for kind, body in _messages(nl.recv(_DUMP_BUFFER)):
                if kind == NLMSG_DONE:
                    return rows
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EIO
                    raise OSError(code, f"sock_diag dump: {os.strerror(code)}")
                if kind == SOCK_DIAG_BY_FAMILY and len(body) >= _MSG_SIZE:
                    rows.append((
                        _host(socket.inet_ntop(family, body[8 : 8 + _width(family)])),
                        _host(socket.inet_ntop(family, body[24 : 24 + _width(family)])),
                        _PORTS.unpack_from(body, 4)[1],
                    ))  # fmt: skip
    raise OSError(errno.ETIMEDOUT, f"sock_diag dump: no end in {TIMEOUT_S:g} s")


def _width(family: int) -> int:
    """The bytes of an address of ``family`` (at the start of ``inet_diag_sockid``'s 16)."""
    return 4 if family == socket.AF_INET else 16


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram (each padded to 4 bytes)."""
    at = 0
    while at + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, at)
        if length < _NLMSGHDR.size or at + length > len(data):
            return  # malformed: nothing more in it can be trusted
        yield kind, data[at + _NLMSGHDR.size : at + length]
        at += (length + 3) & ~3


#: ``SO_ATTACH_FILTER`` (asm-generic/socket.h) and a classic BPF program of one
#: instruction, ``ret #0``: every packet dropped.
SO_ATTACH_FILTER = 26
_DROP_ALL = (ctypes.c_uint64 * 1)(0x0000000000000006)


def refuse_all(fd: int) -> None:
    """Make the listening TCP socket ``fd`` take no more connections, without closing it or
    what it accepted: a socket filter that drops every packet, so a connection attempt is
    never answered (its SYN is dropped); the sockets it accepted already have filters of
    their own (none). OSError if the kernel refuses."""
    prog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(_DROP_ALL))
    with socket.socket(fileno=os.dup(fd)) as listener:  # the same socket, closed again at once
        listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
