"""hm-agent's typed configuration: its settings, ``--mr`` specs and grants, and their checks.

The layers are those of hmmd (``hmmirror.transport.settings``): defaults < the
``--config`` TOML file (keys as the long flags) < environment < flags. The
environment variables are ``HMMIRROR_ENDPOINT`` (hmmd, as for every client),
``HMMIRROR_AGENT_LISTEN``, ``_LISTEN_KEY``, ``_LISTEN_ALLOW``, ``_NAME``, ``_DMA_WINDOW``,
``HMMIRROR_SERVER_KEY`` and ``HMMIRROR_CLIENT_KEY``; an empty one counts as unset.
``--mr`` flags replace the file's ``mr`` list; ``--grant`` flags add to its
``[[grant]]`` tables. Everything is checked before anything starts, so
``check-config`` refuses all that ``run`` would: the MR specs, the endpoints'
form (and that the listener's host resolves), that grants name MRs that exist,
the listener's keys and the keys towards hmmd.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq.auth
from hmmirror.client.mlx5.grants import MR_NAME, Grant, GrantError, Grants, grant_from_table
from hmmirror.client.mlx5.verbs import WHOLE_ADDRESS_SPACE, AccessFlags
from hmmirror.client.window import DEFAULT_SIZE, PAGE_SIZE
from hmmirror.proto.messages import MAX_WINDOW
from hmmirror.transport.keys import CertificateError, CurveKeys
from hmmirror.transport.settings import (
    BOOL,
    LOG_LEVEL,
    NONEMPTY,
    STRING,
    ConfigError,
    Kind,
    build,
    choice,
    format_size,
    parse_bind_endpoint,
    parse_endpoint,
    parse_size,
    read_file,
    setting,
    show_value,
)

DEFAULT_DAEMON = "ipc:///run/hmmirror/hmmd.sock"
#: The most hmmds of one host an agent may talk to (``daemon``, comma-separated).
MAX_DAEMONS = 16
#: The port perftest's RDMA tools have always used.
DEFAULT_LISTEN = "tcp://127.0.0.1:18515"
_LENGTH = re.compile(r"^(0x[0-9a-fA-F]+|\d+)([KMG]?)$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_RIGHTS = {
    "r": AccessFlags.REMOTE_READ,
    "w": AccessFlags.REMOTE_WRITE | AccessFlags.LOCAL_WRITE,
    "a": AccessFlags.REMOTE_ATOMIC | AccessFlags.LOCAL_WRITE,
}


@dataclass(frozen=True)
class MrSpec:
    """One ``--mr`` registration: process, range (None: implicit) and access, and its name."""

    pid: int
    addr: int
    length: int
    access: AccessFlags
    name: str = ""

    @property
    def implicit(self) -> bool:
        """Whether this is a whole-address-space MR."""
        return self.length == WHOLE_ADDRESS_SPACE


def parse_length(text: str) -> int:
    """``4096``, ``0x1000``, ``64K``, ``2M`` or ``1G`` as bytes (an MR's length)."""
    m = _LENGTH.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a size (like 4096, 0x1000, 64K, 2M, 1G)")
    return int(m.group(1), 0) * _UNITS[m.group(2)]


def parse_mr(text: str, default_name: str = "", where: str = "--mr") -> MrSpec:
    """``[NAME=]PID:ADDR:LENGTH[:RIGHTS]`` or ``[NAME=]PID:all[:RIGHTS]``; RIGHTS r, w, a."""
    name, _, rest_text = text.rpartition("=")
    parts = rest_text.split(":")
    try:
        if name and not MR_NAME.match(name):
            raise ValueError(f"name {name!r} is not letters, digits, _ . - (at most 64)")
        pid = int(parts[0])
        if len(parts) >= 2 and parts[1] == "all":
            addr, length, rest = 0, WHOLE_ADDRESS_SPACE, parts[2:]
        elif len(parts) >= 3:
            addr, length, rest = int(parts[1], 0), parse_length(parts[2]), parts[3:]
        else:
            raise ValueError("too few fields")
        if len(rest) > 1:
            raise ValueError("too many fields")
        letters = rest[0] if rest else "r"
        if not letters or set(letters) - set(_RIGHTS):
            raise ValueError(f"rights {letters!r} are not a combination of r, w, a")
    except ValueError as exc:
        raise ConfigError(
            f"{where} {text!r}: {exc}; expected [NAME=]PID:ADDR:LENGTH[:RIGHTS] or "
            "[NAME=]PID:all[:RIGHTS]"
        ) from exc
    access = AccessFlags.ON_DEMAND
    for letter in letters:
        access |= _RIGHTS[letter]
    return MrSpec(pid, addr, length, access, name or default_name)


def rights(access: AccessFlags) -> str:
    """The RIGHTS letters of ``access``."""
    return "".join(
        letter
        for letter, flag in (
            ("r", AccessFlags.REMOTE_READ),
            ("w", AccessFlags.REMOTE_WRITE),
            ("a", AccessFlags.REMOTE_ATOMIC),
        )
        if access & flag
    )


def _mrs(value: Any, label: str) -> tuple[MrSpec, ...]:
    """The ``mr`` list: SPEC strings, named mr1, mr2, ... by position unless they say."""
    if not isinstance(value, list):
        raise ConfigError(f"{label} must be a list of SPEC strings")
    return tuple(parse_mr(str(spec), f"mr{i}", label) for i, spec in enumerate(value, 1))


def _grants(value: Any, label: str) -> tuple[Grant, ...]:
    """``grant`` entries: ``[[grant]]`` tables, or ``--grant`` strings."""
    if not isinstance(value, list):
        raise ConfigError(f"{label} must be a list of [[grant]] tables or strings")
    try:
        return tuple(
            g for i, e in enumerate(value) for g in grant_from_table(e, f"{label} {i + 1}")
        )
    except GrantError as exc:
        raise ConfigError(str(exc)) from exc


def _window_size(value: Any, label: str) -> int:
    """A DMA window's size: ``off`` or 0 (none), or a multiple of 4 KiB up to 64 MiB."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "0")):
        return 0
    size = parse_size(value, label)
    if size and (size % PAGE_SIZE or size > MAX_WINDOW):
        raise ConfigError(f"{label} must be off or a multiple of 4KiB up to 64MiB, got {value!r}")
    return size


WINDOW_SIZE = Kind(_window_size, lambda size: show_value(format_size(size) if size else "off"))
MRS = Kind(_mrs)
GRANTS = Kind(_grants, accumulates=True)


@dataclass(frozen=True)
class AgentConfig:
    """Everything hm-agent can be told (the file's keys are these names)."""

    daemon: str = setting(DEFAULT_DAEMON, NONEMPTY, env="HMMIRROR_ENDPOINT")
    """hmmd's endpoint; on a host that runs several hmmds, all of theirs, comma-separated:
    each MR is registered with the one that watches its process (SPEC §1.7); one that does
    not answer at start is left out, with a warning, while another does."""
    listen: str = setting(DEFAULT_LISTEN, NONEMPTY, env="HMMIRROR_AGENT_LISTEN")
    """Where to serve RDMA (tcp:// or ipc://; port 0 picks a free one)."""
    name: str = setting("mlx5_0", NONEMPTY, env="HMMIRROR_AGENT_NAME")
    """The device name (``hmmctl stat mr``) and the session's name at hmmd."""
    mr: tuple[MrSpec, ...] = setting((), MRS, env=None)
    """The MRs to register, in order."""
    log_level: str = setting("info", LOG_LEVEL, env=None)
    log_format: str = setting("text", choice("text", "json"), env=None)
    """stderr's log lines: text (timestamped; journald's priorities under systemd) or JSON,
    as hmmd writes them (``hmmirror.daemon.logfmt``)."""
    server_key: str = setting("", STRING)
    """hmmd's public CURVE certificate (a tcp:// hmmd)."""
    client_key: str = setting("", STRING)
    """This agent's secret CURVE certificate towards hmmd."""
    listen_key: str = setting("", STRING, env="HMMIRROR_AGENT_LISTEN_KEY")
    """This agent's secret CURVE certificate (a tcp:// listener)."""
    listen_allow: str = setting("", STRING, env="HMMIRROR_AGENT_LISTEN_ALLOW")
    """The directory of the public certificates of requesters allowed to connect."""
    insecure: bool = setting(False, BOOL, env=None)
    """Serve a tcp:// listener as plain TCP, with no authentication."""
    dma_window: int = setting(DEFAULT_SIZE, WINDOW_SIZE, env="HMMIRROR_AGENT_DMA_WINDOW")
    """The shared-memory DMA window's size (SPEC §4.9; an ipc:// hmmd only); 0: none."""
    grant: tuple[Grant, ...] = setting((), GRANTS, env=None)
    """Who may use which MRs, and how (``[[grant]]`` tables, then ``--grant`` flags)."""

    @property
    def daemons(self) -> tuple[str, ...]:
        """The hmmd endpoints ``daemon`` names, in order."""
        return tuple(part.strip() for part in self.daemon.split(","))

    @property
    def mr_numbers(self) -> dict[str, int]:
        """MR names by the number they will be registered as (1, 2, ...), before they are."""
        return {spec.name: i for i, spec in enumerate(self.mr, 1)}


def load(
    path: str | None, flags: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> AgentConfig:
    """The effective AgentConfig, checked; raise ConfigError in one line."""
    file = read_file(path) if path else {}
    env = os.environ if env is None else env
    # hm-agent has always let an empty variable stand for unset (Environment=X= in a unit).
    conf = build(AgentConfig, file, path or "config", env, flags, blank_env_unsets=True)
    # The endpoints are checked once the layers are merged: an environment variable or a
    # flag may stand in for a file's endpoint that this host cannot use.
    daemons = conf.daemons
    for endpoint in daemons:
        parse_endpoint(endpoint, "daemon")
    if len(set(daemons)) != len(daemons) or len(daemons) > MAX_DAEMONS:
        raise ConfigError(
            f"daemon: at most {MAX_DAEMONS} different hmmd endpoints, got {conf.daemon!r}"
        )
    names = [spec.name for spec in conf.mr]
    if len(set(names)) != len(names):
        raise ConfigError(f"MR names must differ: {names}")
    try:
        Grants(conf.grant, conf.mr_numbers)  # every grant names MRs that exist
    except GrantError as exc:
        raise ConfigError(str(exc)) from exc
    check_listen(conf)
    check_daemon_keys(conf)
    return conf


def check_daemon_keys(conf: AgentConfig) -> None:
    """server_key and client_key: both or neither, and loadable (``serve`` uses them)."""
    if not (conf.server_key or conf.client_key):
        return
    if not (conf.server_key and conf.client_key):
        raise ConfigError("server_key and client_key go together: set both, or neither")
    try:
        CurveKeys.load(conf.server_key, conf.client_key)
    except CertificateError as exc:
        raise ConfigError(f"server_key/client_key: {exc}") from exc


def check_listen(conf: AgentConfig) -> None:
    """The listen endpoint's scheme and security settings make sense (before anything starts)."""
    listen = parse_bind_endpoint(conf.listen, "listen")
    if listen.startswith("ipc://"):
        if conf.listen_key or conf.listen_allow or conf.insecure:
            raise ConfigError(
                f"{listen} is ipc://: requesters are known by uid; listen_key, listen_allow "
                "and insecure are for tcp:// only"
            )
        return
    if conf.insecure:
        if conf.listen_key or conf.listen_allow:
            raise ConfigError("insecure and listen_key/listen_allow exclude each other")
        return
    if not (conf.listen_key and conf.listen_allow):
        raise ConfigError(
            f"{listen} is a tcp:// endpoint: set listen_key (this agent's .key_secret) and "
            "listen_allow (a directory of allowed requesters' .key files), or insecure = true "
            "for plain TCP"
        )
    try:
        mode = os.stat(conf.listen_key).st_mode
    except OSError as exc:
        raise ConfigError(f"listen_key: cannot read {conf.listen_key}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ConfigError(
            f"listen_key: {conf.listen_key} is readable by others (mode {mode & 0o777:o}); "
            "chmod 600 it"
        )
    try:
        _, secret = zmq.auth.load_certificate(conf.listen_key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"listen_key: {exc}") from exc
    if secret is None:
        raise ConfigError(f"listen_key: {conf.listen_key} holds no secret key (.key_secret)")
    if not os.path.isdir(conf.listen_allow):
        raise ConfigError(f"listen_allow: {conf.listen_allow} is not a directory")


def reload_grants(path: str | None, flag_grants: Sequence[str], names: Mapping[str, int]) -> Grants:
    """The grants of the config file as it is now, plus the ``--grant`` flags (SIGHUP)."""
    entries = read_file(path).get("grant", []) if path else []
    grants = _grants(entries, f"{path}: grant") + _grants(list(flag_grants), "--grant")
    try:
        return Grants(grants, names)
    except GrantError as exc:
        raise ConfigError(str(exc)) from exc
