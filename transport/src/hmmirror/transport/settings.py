"""The typed configuration layer of hmmirror's programs (hmmd, hm-agent), and their CLI conventions.

A program declares its settings as a frozen dataclass whose fields are made by
``setting``: a default, a ``Kind`` that checks and converts a raw value, and the
``HMMIRROR_*`` environment variable that may set it. ``build`` fills that dataclass
from the layers, each beating the one before::

    defaults in code < TOML file < HMMIRROR_* environment < command-line flags

Unknown keys in the file are an error, so a typo never silently becomes a default;
every error is a ``ConfigError`` whose one-line message names the source (the file,
the variable or the flag) and the key. ``refuse`` prints it the way every program
does, ``<prog>: configuration error: ...``, and returns ``EXIT_USAGE``; ``Parser``
makes argparse's usage errors one line too, with the same exit status, and ``flag``
turns a kind's parser into an argparse ``type``. Everything ``run`` would refuse
is refused here, so ``check-config`` is the whole check.
Durations are strings such as ``"2s"``, ``"250ms"`` or ``"1m"`` (1 ms at least);
sizes ``"32MiB"``; endpoints ``ipc://PATH`` or ``tcp://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import re
import socket
import stat
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar

from hmmirror.proto.version import PROTOCOL_VERSION

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: Exit codes of every hmmirror program: a usage or configuration error is 2, which the
#: systemd units do not restart (``RestartPreventExitStatus=2``): it would recur.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: The environment variables' prefix; a setting's variable is ``HMMIRROR_<KEY>`` unless it
#: names another.
ENV_PREFIX = "HMMIRROR_"
LOG_LEVELS = ("debug", "info", "warning", "error")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)?\s*$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
#: The shortest duration any setting takes: below it a timer or a poll only burns CPU, and
#: the wire carries milliseconds (a heartbeat of 0.0001ms used to become 1e-07s).
MIN_DURATION = 0.001
#: The longest ipc:// socket path: ``sun_path`` holds 108 bytes with the terminating NUL.
MAX_IPC_PATH = 107
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|K|M|G)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_KIND, _ENV = "hmmirror.kind", "hmmirror.env"
T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the source."""


def refuse(prog: str, exc: Exception) -> int:
    """Print a configuration error as every program does, in one line; return EXIT_USAGE."""
    print(f"{prog}: configuration error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def version_line(prog: str, version: str) -> str:
    """What ``PROG --version`` prints: ``hmmd 0.1.0, protocol 1.0``."""
    return f"{prog} {version}, protocol {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}"


def distribution_version(name: str) -> str:
    """The version of the installed distribution ``name`` (the repository's VERSION file is
    its one source), read when asked: importing ``importlib.metadata`` alone was a sixth of
    every program's start, and most starts never print a version."""
    from importlib.metadata import version

    return version(name)


class VersionAction(argparse.Action):
    """``--version``: print what ``line`` says (the program's ``version`` command's line)
    on stdout and exit 0, as argparse's own action does, reading the version only then."""

    def __init__(
        self, option_strings: list[str], dest: str, *, line: Callable[[], str], **kwargs: Any
    ) -> None:
        kwargs.setdefault("help", "show program's version number and exit")
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS,
                         **kwargs)  # fmt: skip
        self.line = line

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(self.line())
        parser.exit()


# --- values -------------------------------------------------------------------------------


def parse_duration(
    text: str | float | int, key: str = "duration", minimum: float = MIN_DURATION
) -> float:
    """Parse ``"2s"``, ``"250ms"``, ``"1.5m"`` (or a number of seconds) into seconds, at
    least ``minimum`` (1 ms unless told; 0 allows zero)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise ConfigError(f"{key}: {text!r} is not a duration like '2s' or '250ms'")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or value < 0 or (value == 0 and minimum > 0):
        raise ConfigError(f"{key}: {text!r} must be a positive duration")
    if value < minimum:
        raise ConfigError(f"{key}: {text!r} is shorter than {format_duration(minimum)}")
    return value


def format_duration(seconds: float) -> str:
    """A duration the way people write it: ``"2ms"`` below a second, else ``"2s"``."""
    if 0 < seconds < 1:
        return f"{round(seconds * 1000, 6):g}ms"
    return f"{round(seconds, 9):g}s"


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


def parse_string(value: Any, label: str) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise ConfigError(f"{label} must be a string, got {value!r}")
    return value


def show_value(value: Any) -> str:
    """``value`` as TOML writes it: true/false, a bare number, or a double-quoted string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return repr(value).replace("'", '"')


# --- kinds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How one setting is read and written.

    ``parse(value, label)`` checks and converts a raw value (from TOML, a string from
    the environment or a flag) and raises ConfigError with ``label`` (``SOURCE: key``,
    or the flag) in its message; ``show`` writes the value back in the file's format.
    An ``accumulates`` setting's flags add to what the file and environment gave (its
    values are tuples) instead of replacing it.
    """

    parse: Callable[[Any, str], Any]
    show: Callable[[Any], str] = show_value
    accumulates: bool = False


def _boolean(value: Any, label: str) -> bool:
    """true/false, or 1/0, yes/no, on/off as strings (the environment's only type)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{label} must be true or false, got {value!r}")


def _whole(value: Any, label: str) -> int:
    """A whole number: 0, 1, 2, ..."""
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ConfigError(f"{label} must be a whole number, got {value!r}")
    return int(value)


def _nonempty(value: Any, label: str) -> str:
    """A string with something in it."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{label} must be a non-empty string")
    return value


STRING = Kind(parse_string)
NONEMPTY = Kind(_nonempty)
BOOL = Kind(_boolean)
WHOLE = Kind(_whole)
DURATION = Kind(parse_duration, lambda seconds: show_value(format_duration(seconds)))


def parse_endpoint(value: Any, label: str) -> str:
    """``ipc://PATH`` (at most 107 bytes) or ``tcp://HOST:PORT`` (``[v6]`` allowed, PORT
    0 to 65535): the endpoints a client dials, checked by form only."""
    text = parse_string(value, label)
    if text.startswith("ipc://"):
        path = text[len("ipc://") :]
        if not path:
            raise ConfigError(f"{label}: {text!r} names no socket path (ipc://PATH)")
        if len(path.encode()) > MAX_IPC_PATH:
            raise ConfigError(
                f"{label}: the socket path of {text!r} is longer than {MAX_IPC_PATH} bytes"
            )
        return text
    if not text.startswith("tcp://"):
        raise ConfigError(
            f"{label} must start with ipc:// or tcp://, got {value!r}: only tcp:// and ipc:// "
            "are served"
        )
    _host_port(text[len("tcp://") :], text, label)
    return text


def parse_bind_endpoint(value: Any, label: str) -> str:
    """An endpoint to bind: ``parse_endpoint``'s form, and a tcp:// HOST that resolves
    (``*`` is every address), since the bind would fail on it."""
    text = parse_endpoint(value, label)
    if text.startswith("tcp://"):
        _resolvable(*_host_port(text[len("tcp://") :], text, label), text, label)
    return text


def parse_hostport(value: Any, label: str) -> str:
    """``HOST:PORT`` to listen on (an empty string for none), HOST resolvable."""
    text = parse_string(value, label)
    if text:
        _resolvable(*_host_port(text, text, label), text, label)
    return text


def _host_port(rest: str, text: str, label: str) -> tuple[str, int]:
    """``HOST:PORT`` of ``rest`` (``[v6]`` allowed, PORT 0 to 65535), or ConfigError."""
    host, sep, port = rest.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{label}: {text!r} is not HOST:PORT with a port of 0 to 65535")
    return host.strip("[]"), int(port)


def _resolvable(host: str, port: int, text: str, label: str) -> None:
    """Refuse a HOST that names no address (as the bind would)."""
    if host == "*":
        return
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as the bind picks it
        socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{label}: cannot resolve the host of {text!r}: {reason}") from exc


ENDPOINT = Kind(parse_endpoint)
BIND_ENDPOINT = Kind(parse_bind_endpoint)
HOSTPORT = Kind(parse_hostport)


def size(minimum: int = 0) -> Kind:
    """A size in bytes (``"32MiB"``), at least ``minimum``."""

    def parse(value: Any, label: str) -> int:
        """The size, checked against the minimum."""
        out = parse_size(value, label)
        if out < minimum:
            raise ConfigError(f"{label} must be at least {format_size(minimum)}")
        return out

    return Kind(parse, lambda value: show_value(format_size(value)))


def number(minimum: float) -> Kind:
    """A number (a float), at least ``minimum``."""

    def parse(value: Any, label: str) -> float:
        """The number, checked against the minimum."""
        try:
            out = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{label} must be a number, got {value!r}") from exc
        if out < minimum:
            raise ConfigError(f"{label} must be at least {minimum:g}")
        return out

    return Kind(parse)


def integer(minimum: int, maximum: int) -> Kind:
    """A whole number, negative ones too, from ``minimum`` to ``maximum``."""

    def parse(value: Any, label: str) -> int:
        """The integer, checked against the range."""
        text = str(value).strip()
        if isinstance(value, bool) or not text.lstrip("+-").isdigit():
            raise ConfigError(f"{label} must be a whole number, got {value!r}")
        out = int(text)
        if not minimum <= out <= maximum:
            raise ConfigError(f"{label} must be from {minimum} to {maximum}, got {out}")
        return out

    return Kind(parse)


def choice(*values: str, fold_case: bool = False) -> Kind:
    """One of ``values`` (compared in lower case, and kept so, if ``fold_case``)."""
    allowed = " or ".join(map(repr, values)) if len(values) == 2 else f"one of {sorted(values)}"

    def parse(value: Any, label: str) -> str:
        """The value, if it is one of the choices."""
        text = parse_string(value, label)
        text = text.lower() if fold_case else text
        if text not in values:
            raise ConfigError(f"{label} must be {allowed}, got {value!r}")
        return text

    return Kind(parse)


LOG_LEVEL = choice(*LOG_LEVELS, fold_case=True)


def setting(
    default: Any = dataclasses.MISSING,
    kind: Kind = STRING,
    *,
    env: str | None = "",
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A settings dataclass field: its default (or ``factory``), kind and environment variable.

    ``env`` names the variable; empty (the default) means ``HMMIRROR_<NAME>``, None none.
    """
    metadata = {_KIND: kind, _ENV: env}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def env_var(field: dataclasses.Field[Any]) -> str | None:
    """The environment variable that sets ``field``, or None."""
    name: str | None = field.metadata.get(_ENV, "")
    return f"{ENV_PREFIX}{field.name.upper()}" if name == "" else name


def _kind(field: dataclasses.Field[Any]) -> Kind:
    """The kind of ``field`` (a plain string for a field not made by ``setting``)."""
    kind: Kind = field.metadata.get(_KIND, STRING)
    return kind


# --- layers -------------------------------------------------------------------------------


class UntrustedFile(PermissionError):
    """A file whose owner or mode does not allow trusting it (``untrusted``)."""


def untrusted(st: os.stat_result) -> str | None:
    """Why a file (or directory) with status ``st`` may not be trusted to configure this
    program, or None: it must be root's or this process's user's, and writable by no one
    else. hmmd acts for every user: a file another user could write (or replace, being its
    owner) would let that user choose its settings, grants or keys."""
    if st.st_uid not in (0, os.geteuid()):
        return f"it belongs to uid {st.st_uid}, neither root nor this program's user"
    if stat.S_ISCHR(st.st_mode) and st.st_uid == 0:
        return None  # a device of root's, /dev/null (--config /dev/null: no file at all)
    if st.st_mode & 0o022:
        return f"others may write it (mode {st.st_mode & 0o777:o}); chmod go-w it"
    return None


def open_trusted(path: str) -> BinaryIO:
    """``path`` opened for reading, once its owner and mode allow trusting it (``untrusted``,
    judged on the open file, not the path); UntrustedFile naming why not."""
    f = open(path, "rb")  # noqa: SIM115 (returned to the caller, who closes it)
    why = untrusted(os.fstat(f.fileno()))
    if why is not None:
        f.close()
        raise UntrustedFile(errno.EPERM, f"{path}: {why}")
    return f


def read_file(path: str, section: str | None = None) -> dict[str, Any]:
    """The settings in the TOML file ``path`` (its ``[section]`` table, if it has one)."""
    try:
        with open_trusted(path) as f:
            data = tomllib.load(f)
    except UntrustedFile as exc:
        raise ConfigError(f"config file {exc.strerror}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    table = data.get(section, data) if section else data
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {section} must be a table")
    return table


def build(
    cls: type[T],
    file: Mapping[str, Any],
    file_name: str,
    env: Mapping[str, str],
    flags: Mapping[str, Any],
    *,
    blank_env_unsets: bool = False,
) -> T:
    """The settings dataclass ``cls`` from the layers: defaults < file < env < flags.

    ``file`` holds the file's keys (``read_file``), named ``file_name`` in errors;
    ``flags`` maps setting names to flag values, None for a flag not given. With
    ``blank_env_unsets`` an empty environment variable counts as not set.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in file.items():
        if key not in fields:
            raise ConfigError(f"{file_name}: unknown key {key!r}")
        values[key] = _kind(fields[key]).parse(value, f"{file_name}: {key}")
    for key, field in fields.items():
        var = env_var(field)
        if var is not None and var in env and (env[var] or not blank_env_unsets):
            values[key] = _kind(field).parse(env[var], var)
    for key, value in flags.items():
        if value is None:
            continue
        kind = _kind(fields[key])
        parsed = kind.parse(value, f"--{key.replace('_', '-')}")
        if kind.accumulates:
            parsed = values.get(key, _default(fields[key])) + parsed
        values[key] = parsed
    return cls(**values)


def _default(field: dataclasses.Field[Any]) -> Any:
    """The default value of ``field``."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def as_toml(settings: DataclassInstance) -> str:
    """The settings dataclass instance ``settings``, in the file's format."""
    return "".join(
        f"{f.name} = {_kind(f).show(getattr(settings, f.name))}\n"
        for f in dataclasses.fields(settings)
    )


# --- command lines ------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (``hmmctl: top: argument --count: ...``,
    pointing at ``--help``) and exit status 2, as a configuration error is."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as every hmmirror program prints a usage error; exit 2."""
        prog, _, command = self.prog.partition(" ")
        where = f"{prog}: {command}: " if command else f"{prog}: "
        self.exit(EXIT_USAGE, f"{where}{message} (see {self.prog} --help)\n")


def flag(parse: Callable[[Any, str], Any], name: str) -> Callable[[str], Any]:
    """An argparse ``type`` for the flag ``name`` from a kind's parser (``parse_duration``,
    ``parse_endpoint``, ...): its ConfigError becomes argparse's one-line usage error."""

    def convert(text: str) -> Any:
        """The flag's value, checked."""
        try:
            return parse(text, name)
        except ConfigError as exc:  # argparse itself says "argument NAME: "
            why = str(exc).removeprefix(f"{name}: ").removeprefix(f"{name} ")
            raise argparse.ArgumentTypeError(why) from exc

    return convert


def whole_number(minimum: int = 0) -> Callable[[Any, str], int]:
    """A parser of whole numbers of at least ``minimum``, for ``flag``."""

    def parse(value: Any, label: str) -> int:
        """The number, checked."""
        number = _whole(value, label)
        if number < minimum:
            raise ConfigError(f"{label} must be at least {minimum}, got {value!r}")
        return number

    return parse
