"""hmmd's typed configuration: defaults in code < TOML file < HMMIRROR_* environment < flags.

Durations are strings such as ``"2s"``, ``"250ms"`` or ``"1m"``, parsed once
here. Unknown keys in the file are an error, so a typo never silently becomes
a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hmmirror.transport.keys import CertificateError, ServerKeys

DEFAULT_CONFIG_FILE = "/etc/hmmirror/hmmd.toml"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)?\s*$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|K|M|G)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
#: The smallest reply cap: two of the largest replies (a 1024-page DMA read and its entries).
MIN_REPLY_CAP = 8 << 20


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the source."""


def parse_duration(text: str | float | int, key: str = "duration") -> float:
    """Parse ``"2s"``, ``"250ms"``, ``"1.5m"`` (or a number of seconds) into seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise ConfigError(f"{key}: {text!r} is not a duration like '2s' or '250ms'")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if value <= 0:
        raise ConfigError(f"{key}: {text!r} must be positive")
    return value


def parse_size(text: str | int, key: str = "size") -> int:
    """Parse ``"32MiB"``, ``"64M"``, ``"1GiB"`` (binary units) or a number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise ConfigError(f"{key}: {text!r} is not a size like '32MiB' or '65536'")
    unit = match.group(2)
    return int(match.group(1)) * _SIZE_UNITS[unit[0] if unit else None]


def format_size(value: int) -> str:
    """A size the way the file writes it: ``"32MiB"``, ``"512KiB"`` or plain bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value and value % (1 << shift) == 0:
            return f"{value >> shift}{unit}"
    return str(value)


def default_endpoint() -> str:
    """``ipc://$RUNTIME_DIRECTORY/hmmd.sock`` under systemd, else ``/run/hmmirror/hmmd.sock``."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "/run/hmmirror").split(":")[0]
    return f"ipc://{runtime}/hmmd.sock"


@dataclass(frozen=True)
class Config:
    """Everything hmmd can be told. Durations are in seconds."""

    endpoint: str = dataclasses.field(default_factory=default_endpoint)
    heartbeat: float = 1.0
    """How often agents must send a heartbeat (announced at HELLO)."""
    lease_factor: float = 3.0
    """A session expires after ``lease_factor * heartbeat`` without a message."""
    ack_deadline: float = 2.0
    """An INVALIDATE not acked within this time evicts the mirror's session."""
    copy_deadline: float = 1.0
    """A copy into or out of a target (populate, DMA, atomic) not done within this time is
    answered EBUSY, and that target's later copies are refused until it returns. Keep it
    below ``ack_deadline``: an agent's DMA in flight holds its ACKs."""
    poll_min: float = 0.002
    """Fastest proc watcher poll interval (right after a change)."""
    poll_max: float = 0.05
    """Slowest proc watcher poll interval (while nothing changes)."""
    log_level: str = "info"
    log_format: str = "text"
    """stderr log lines: "text", or "json" (one object per line, for log collectors)."""
    socket_group: str = "hmmirror"
    """The group given the ipc:// and uffd intake sockets (mode 0660), when it exists."""
    uffd: str = "cooperate"
    """How hmmd gets a target's userfaultfd: "off"; "cooperate": one the target exposed
    (``hmmirror.client.expose``), or an unconfigured one it left open, taken with pidfd_getfd;
    or "inject" (opt-in): failing those, create one in the target with ptrace."""
    uffd_fork: str = "close"
    """What to do with a watched target's forked child's userfaultfd: "close" it, or "adopt"
    it, so the child is watched through it as soon as an agent mirrors the child."""
    policy: str = ""
    """A policy file of grants (see ``policy``); empty: allow whatever the socket lets in."""
    metrics: str = ""
    """``HOST:PORT`` for a Prometheus ``/metrics`` endpoint; empty (the default) for none."""
    insecure: bool = False
    """Allow a tcp:// endpoint without CURVE (logged as a warning). Never needed for ipc://."""
    curve_key: str = ""
    """The daemon's secret CURVE certificate (``hmmctl keys generate``); mode 0600 or stricter."""
    curve_allow: str = ""
    """A directory of the public certificates (``*.key``) of the agents allowed to connect."""
    expose_socket: str = ""
    """Where targets send their userfaultfd (empty: the ipc:// endpoint's side door itself;
    for a tcp:// endpoint, hmmd.uffd.sock in the runtime directory)."""
    max_connections: int = 0
    """Connections hmmd keeps at most (0: a quarter of its descriptor limit allows)."""
    max_connections_per_peer: int = 32
    """Connections one local uid (root is not limited) or one remote address may hold."""
    reply_cap: int = 32 << 20
    """The most reply bytes hmmd keeps queued (or being prepared) for one connection; past
    it requests are refused with EBUSY, and a peer that stays there without reading for
    ``ack_deadline`` is evicted. hmmd's memory for replies is at most connections x this."""
    root_frames: str = "physical"
    """What entries carry for a root agent over ipc: "physical" PFNs (it could read them from
    pagemap itself), or frame "token"s like every agent without a ``frames = "physical"``
    grant (benchmarks compare the two; a site may want no PFN to leave hmmd at all)."""

    @property
    def heartbeat_ms(self) -> int:
        """The heartbeat interval in milliseconds, as the wire carries it."""
        return max(1, int(self.heartbeat * 1000))

    @property
    def lease(self) -> float:
        """The lease in seconds."""
        return self.heartbeat * self.lease_factor

    def as_toml(self) -> str:
        """The effective configuration, in the file format."""
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _DURATIONS:
                value = f"{value:g}s"
            if f.name in _SIZES:
                value = format_size(value)
            if isinstance(value, bool):
                lines.append(f"{f.name} = {'true' if value else 'false'}")
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                lines.append(f"{f.name} = {value}")
                continue
            lines.append(f"{f.name} = {value!r}".replace("'", '"'))
        return "\n".join(lines) + "\n"


_DURATIONS = {"heartbeat", "ack_deadline", "copy_deadline", "poll_min", "poll_max"}
_FLOATS = {"lease_factor"}
_SIZES = {"reply_cap"}
_BOOLS = {"insecure"}
_INTS = {"max_connections", "max_connections_per_peer"}
_LEVELS = {"debug", "info", "warning", "error"}
_UFFD_MODES = {"off", "cooperate", "inject"}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check and convert setting ``key`` read from ``source``; raise ConfigError."""
    if key in _DURATIONS:
        return parse_duration(value, f"{source}: {key}")
    if key in _SIZES:
        size = parse_size(value, f"{source}: {key}")
        if size < MIN_REPLY_CAP:
            raise ConfigError(f"{source}: {key} must be at least {format_size(MIN_REPLY_CAP)}")
        return size
    if key in _BOOLS:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if key in _INTS:
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ConfigError(f"{source}: {key} must be a whole number, got {value!r}")
        return int(value)
    if key in _FLOATS:
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from exc
        if number < 1:
            raise ConfigError(f"{source}: {key} must be at least 1")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    if key == "log_level" and value.lower() not in _LEVELS:
        raise ConfigError(f"{source}: log_level must be one of {sorted(_LEVELS)}")
    if key == "log_format" and value not in ("text", "json"):
        raise ConfigError(f"{source}: log_format must be 'text' or 'json', got {value!r}")
    if key == "uffd_fork" and value not in ("close", "adopt"):
        raise ConfigError(f"{source}: uffd_fork must be 'close' or 'adopt', got {value!r}")
    if key == "root_frames" and value not in ("physical", "token"):
        raise ConfigError(f"{source}: root_frames must be 'physical' or 'token', got {value!r}")
    if key == "uffd" and value not in _UFFD_MODES:
        raise ConfigError(f"{source}: uffd must be one of {sorted(_UFFD_MODES)}, got {value!r}")
    if key == "endpoint" and not value.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"{source}: endpoint must start with ipc:// or tcp://, got {value!r}")
    return value.lower() if key == "log_level" else value


def load(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective Config from the layers; raise ConfigError naming the bad key."""
    names = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    explicit = path is not None
    path = path or DEFAULT_CONFIG_FILE
    if explicit or os.path.exists(path):
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        section = data.get("hmmd", data)
        for key, value in section.items():
            if key not in names:
                raise ConfigError(f"{path}: unknown key {key!r}")
            values[key] = _coerce(key, value, path)
    env = os.environ if env is None else env
    for key in names:
        var = f"HMMIRROR_{key.upper()}"
        if var in env:
            values[key] = _coerce(key, env[var], var)
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    config = Config(**values)
    if config.poll_min > config.poll_max:
        raise ConfigError("poll_min must not exceed poll_max")
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
