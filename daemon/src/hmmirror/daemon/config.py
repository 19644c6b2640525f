"""hmmd's typed configuration: defaults in code < TOML file < HMMIRROR_* environment < flags.

The layers, the kinds of value and the errors are ``hmmirror.transport.settings``,
which hm-agent's configuration shares; this module declares hmmd's settings (each
``HMMIRROR_<KEY>`` in the environment) and the checks that span several of them.
Durations are strings such as ``"2s"``, ``"250ms"`` or ``"1m"``, parsed once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hmmirror.daemon.linux.priority import NICE_MAX, NICE_MIN
from hmmirror.daemon.owners import OWNERS_DIRNAME
from hmmirror.proto.messages.session import MAX_TERM_MS
from hmmirror.transport.intake import intake_path
from hmmirror.transport.keys import CertificateError, ServerKeys
from hmmirror.transport.settings import (
    BIND_ENDPOINT,
    BOOL,
    DURATION,
    HOSTPORT,
    LOG_LEVEL,
    MAX_IPC_PATH,
    STRING,
    WHOLE,
    ConfigError,
    Kind,
    as_toml,
    build,
    choice,
    integer,
    number,
    parse_string,
    read_file,
    setting,
    size,
)

__all__ = ["DEFAULT_CONFIG_FILE", "MIN_REPLY_CAP", "Config", "ConfigError", "load"]

DEFAULT_CONFIG_FILE = "/etc/hmmirror/hmmd.toml"
#: The smallest reply cap: two of the largest replies (a 1024-page DMA read and its entries).
MIN_REPLY_CAP = 8 << 20


def default_endpoint() -> str:
    """``ipc://$RUNTIME_DIRECTORY/hmmd.sock`` under systemd, else ``/run/hmmirror/hmmd.sock``."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "/run/hmmirror").split(":")[0]
    return f"ipc://{runtime}/hmmd.sock"


def _socket_path(value: Any, label: str) -> str:
    """A Unix socket's path (empty: the default), short enough for ``sun_path``."""
    text = parse_string(value, label)
    if len(text.encode()) > MAX_IPC_PATH:
        raise ConfigError(f"{label}: {text!r} is longer than {MAX_IPC_PATH} bytes")
    return text


@dataclass(frozen=True)
class Config:
    """Everything hmmd can be told. Durations are in seconds."""

    endpoint: str = setting(kind=BIND_ENDPOINT, factory=default_endpoint)
    heartbeat: float = setting(1.0, DURATION)
    """How often agents must send a heartbeat (announced at HELLO)."""
    lease_factor: float = setting(3.0, number(minimum=1))
    """A session expires after ``lease_factor * heartbeat`` without a message."""
    ack_deadline: float = setting(2.0, DURATION)
    """An INVALIDATE not acked within this time evicts the mirror's session."""
    copy_deadline: float = setting(1.0, DURATION)
    """A copy into or out of a target (populate, DMA, atomic) not done within this time is
    answered EBUSY, and that target's later copies are refused until it returns. Keep it
    below ``ack_deadline``: an agent's DMA in flight holds its ACKs."""
    poll_min: float = setting(0.002, DURATION)
    """Fastest proc watcher poll interval (right after a change)."""
    poll_max: float = setting(0.05, DURATION)
    """Slowest proc watcher poll interval (while nothing changes)."""
    nice: int = setting(-10, integer(NICE_MIN, NICE_MAX))
    """The nice value of every hmmd thread (-20 to 19). Target threads wait in munmap and
    madvise until hmmd has read their events, so hmmd runs ahead of ordinary work (0);
    raising a priority needs CAP_SYS_NICE, or ``Nice=`` in the unit (deploy/hmmd.service)."""
    log_level: str = setting("info", LOG_LEVEL)
    log_format: str = setting("text", choice("text", "json"))
    """stderr log lines: "text", or "json" (one object per line, for log collectors)."""
    socket_group: str = setting("hmmirror", STRING)
    """The group given the ipc:// and uffd intake sockets (mode 0660), when it exists."""
    uffd: str = setting("cooperate", choice("off", "cooperate", "inject"))
    """How hmmd gets a target's userfaultfd: "off"; "cooperate": one the target exposed
    (``hmmirror.client.expose``), or an unconfigured one it left open, taken with pidfd_getfd;
    or "inject" (opt-in): failing those, create one in the target with ptrace."""
    uffd_fork: str = setting("close", choice("close", "adopt"))
    """What to do with a watched target's forked child's userfaultfd: "close" it, or "adopt"
    it, so the child is watched through it as soon as an agent mirrors the child."""
    policy: str = setting("", STRING)
    """A policy file of grants (see ``policy``); empty: allow whatever the socket lets in."""
    metrics: str = setting("", HOSTPORT)
    """``HOST:PORT`` for a Prometheus ``/metrics`` endpoint; empty (the default) for none."""
    insecure: bool = setting(False, BOOL)
    """Allow a tcp:// endpoint without CURVE (logged as a warning). Never needed for ipc://."""
    curve_key: str = setting("", STRING)
    """The daemon's secret CURVE certificate (``hmmctl keys generate``); mode 0600 or stricter."""
    curve_allow: str = setting("", STRING)
    """A directory of the public certificates (``*.key``) of the agents allowed to connect."""
    expose_socket: str = setting("", Kind(_socket_path))
    """Where targets send their userfaultfd (empty: the ipc:// endpoint's side door itself;
    for a tcp:// endpoint, hmmd.uffd.sock in the runtime directory)."""
    owners_dir: str = setting("", STRING)
    """Where the hmmd instances of one host record which of them watches each process, so
    that two never watch the same one (SPEC.md §1.7: the loser answers MOVED). Empty: the
    directory ``hmmd-owners`` beside the uffd intake socket (/run/hmmirror/hmmd-owners for
    the default endpoint); "off": claim nothing (only for a host with one hmmd)."""
    max_connections: int = setting(0, WHOLE)
    """Connections hmmd keeps at most (0: a quarter of its descriptor limit allows)."""
    max_connections_per_peer: int = setting(32, WHOLE)
    """Connections one local uid (root is not limited) or one remote address may hold."""
    max_mirrors: int = setting(0, WHOLE)
    """Mirrors hmmd keeps at most, of all agents (0: a quarter of ``vm.max_map_count``: a
    large mirror's two shadow arrays are two mappings of hmmd's own). Past it: TOO_LARGE."""
    max_mirrors_per_peer: int = setting(4096, WHOLE)
    """Mirrors one local uid (root is not limited) or one remote peer may hold."""
    max_mirror_pages_per_peer: int = setting(1 << 28, WHOLE)
    """Pages of address space one local uid (root is not limited) or one remote peer may
    mirror in all (default 2^28: 1 TiB; hmmd keeps 16 bytes per page an agent faulted)."""
    reply_cap: int = setting(32 << 20, size(minimum=MIN_REPLY_CAP))
    """The most reply bytes hmmd keeps queued (or being prepared) for one connection; past
    it requests are refused with EBUSY, and a peer that stays there without reading for
    ``ack_deadline`` is evicted. hmmd's memory for replies is at most connections x this."""
    root_frames: str = setting("physical", choice("physical", "token"))
    """What entries carry for a root agent over ipc: "physical" PFNs (it could read them from
    pagemap itself), or frame "token"s like every agent without a ``frames = "physical"``
    grant (benchmarks compare the two; a site may want no PFN to leave hmmd at all)."""

    @property
    def heartbeat_ms(self) -> int:
        """The heartbeat interval in milliseconds, as the wire carries it."""
        return max(1, int(self.heartbeat * 1000))

    @property
    def owners_path(self) -> str | None:
        """The owners directory in effect; None with ``owners_dir = "off"``."""
        if self.owners_dir == "off":
            return None
        if self.owners_dir:
            return self.owners_dir
        intake = self.expose_socket or intake_path(self.endpoint)
        return os.path.join(os.path.dirname(intake), OWNERS_DIRNAME)

    @property
    def lease(self) -> float:
        """The lease in seconds."""
        return self.heartbeat * self.lease_factor

    def as_toml(self) -> str:
        """The effective configuration, in the file format."""
        return as_toml(self)


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective Config from the layers; raise ConfigError naming the bad key."""
    explicit = path is not None
    path = path or DEFAULT_CONFIG_FILE
    file = read_file(path, section="hmmd") if explicit or os.path.exists(path) else {}
    config = build(Config, file, path, os.environ if env is None else env, flags or {})
    if config.poll_min > config.poll_max:
        raise ConfigError("poll_min must not exceed poll_max")
    longest = MAX_TERM_MS / 1000  # what agents accept in a WELCOME (SPEC §5)
    for name, value in (
        ("heartbeat x lease_factor", config.lease),
        ("ack_deadline", config.ack_deadline),
    ):
        if value > longest:
            raise ConfigError(f"{name} is {value:g} s; agents accept at most {longest:g} s")
    if config.endpoint.startswith("tcp://") and not config.insecure:
        if not (config.curve_key and config.curve_allow):
            raise ConfigError(
                f"{config.endpoint} is a tcp:// endpoint: set curve_key and curve_allow "
                "(hmmctl keys generate), or insecure = true for plain TCP"
            )
        try:
            ServerKeys.load(config.curve_key)
        except CertificateError as exc:
            raise ConfigError(f"curve_key: {exc}") from exc
        if not os.path.isdir(config.curve_allow):
            raise ConfigError(f"curve_allow: {config.curve_allow} is not a directory")
    return config
