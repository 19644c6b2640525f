"""Fetch the pinned uv for ./hmmirror when no uv is on PATH, with nothing but the stdlib.

Debian's python3 refuses ``pip install --user uv`` (PEP 668, an externally managed
environment) and a stock Debian 12 has neither pip nor venv, so ./hmmirror gets uv itself:
the release wheel for this machine, downloaded from the package index, checked against the
sha256 and size pinned below, and its ``uv`` binary unpacked into ``.tools/uv-VERSION/uv``
(git-ignored). Prints that path on stdout. Once it is there, nothing is downloaded again.

The index is PyPI unless ``UV_DEFAULT_INDEX``, ``UV_INDEX_URL`` or ``PIP_INDEX_URL`` names a
mirror (first one set wins); the pinned hash, not the index, is what is trusted, so a mirror
can only fail the fetch, never change what runs. Proxies come from the usual ``https_proxy``
variables (urllib reads them). Every failure is one line on stderr and exit status 1.

    python3 bootstrap/fetch_uv.py        # -> /path/to/repo/.tools/uv-0.13.9/uv
"""

from __future__ import annotations

import hashlib
import html.parser
import io
import json
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

VERSION = "0.13.9"

# platform.machine() -> (wheel file name, sha256, size in bytes), from PyPI's simple API.
# aarch64: the wheel also tagged musllinux holds a static binary, so it runs on any libc.
WHEELS = {
    "x86_64": (
        f"uv-{VERSION}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19",
        17606939,
    ),
    "aarch64": (
        f"uv-{VERSION}-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64"
        ".musllinux_1_1_aarch64.whl",
        "5435c5ce14a56431208ca0996416d310f1598e8c2c8ba707688985a16bb82dbe",
        18026789,
    ),
}
ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

PYPI = "https://pypi.org/simple/"
INDEX_VARIABLES = ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL")
SOCKET_TIMEOUT_S = 30.0  # any one connect or read
DOWNLOAD_DEADLINE_S = 300.0  # the index page and the wheel together
CHUNK = 1 << 16  # read1: one recv at most, so the deadline is checked between recvs
INDEX_PAGE_LIMIT = 16 << 20  # uv's simple page lists every release: a few MB, never more
ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"


class FetchError(Exception):
    """Why uv could not be fetched: one line for the user."""


class _Links(html.parser.HTMLParser):
    """The ``href`` of every anchor of a PEP 503 (HTML) simple index page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Collect an anchor's href."""
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def wheel_for_machine() -> tuple[str, str, int]:
    """The pinned wheel for this machine, or a FetchError naming the machine."""
    if sys.platform != "linux":
        raise FetchError(f"no pinned uv wheel for {sys.platform}")
    machine = platform.machine()
    machine = ALIASES.get(machine, machine)
    if machine not in WHEELS:
        raise FetchError(f"no pinned uv wheel for {machine}")
    return WHEELS[machine]


def index_url() -> str:
    """The simple index to fetch from: the first index variable set, else PyPI."""
    for name in INDEX_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            parts = urllib.parse.urlsplit(value)
            if parts.scheme not in ("http", "https"):
                raise FetchError(f"{name}={value!r} is not an http(s) URL")
            if "@" in parts.netloc:
                # Sending credentials on to wherever the index redirects is not safe with
                # urllib; uv itself handles them.
                raise FetchError(f"{name} carries credentials, which this fetch does not send")
            return value if value.endswith("/") else value + "/"
    return PYPI


def _read(url: str, accept: str, limit: int, deadline: float) -> tuple[bytes, str, str]:
    """GET url: (body, content type, final URL); at most limit bytes, by the deadline."""
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "hmmirror"})
    body = bytearray()
    try:
        with urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT_S) as response:
            while chunk := response.read1(CHUNK):
                body += chunk
                if len(body) > limit:
                    raise FetchError(f"{url} sent more than {limit} bytes")
                if time.monotonic() > deadline:
                    raise FetchError(f"{url} took longer than {DOWNLOAD_DEADLINE_S:.0f} s")
            return bytes(body), response.headers.get("Content-Type", ""), response.geturl()
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        reason = str(exc.reason)
        if "CERTIFICATE_VERIFY_FAILED" in reason:
            reason += " (is the ca-certificates package installed?)"
        raise FetchError(f"{url}: {reason}") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed responses
        raise FetchError(f"{url}: {exc or type(exc).__name__}") from exc


def wheel_url(index: str, filename: str, deadline: float) -> str:
    """Where the index keeps filename: from its JSON (PEP 691) or HTML (PEP 503) page."""
    page_url = urllib.parse.urljoin(index, "uv/")
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    body, content_type, final_url = _read(page_url, accept, INDEX_PAGE_LIMIT, deadline)
    try:
        if "json" in content_type:
            hrefs = [str(entry["url"]) for entry in json.loads(body)["files"]]
        else:
            parser = _Links()
            parser.feed(body.decode("utf-8", "replace"))
            hrefs = parser.hrefs
    except (ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"{page_url} is not a simple index page ({exc})") from exc
    for href in hrefs:
        url = urllib.parse.urljoin(final_url, href).split("#", 1)[0]
        if urllib.parse.unquote(url.rsplit("/", 1)[-1]) == filename:
            return url
    raise FetchError(f"{page_url} does not list {filename}")


def download(index: str, wheel: tuple[str, str, int]) -> bytes:
    """The wheel's bytes, checked against the pinned size and sha256."""
    filename, sha256, size = wheel
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    url = wheel_url(index, filename, deadline)
    data, _, _ = _read(url, "*/*", size, deadline)
    if len(data) != size:
        raise FetchError(f"{url}: {len(data)} bytes, expected {size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise FetchError(f"{url}: sha256 {digest}, expected the pinned {sha256}")
    return data


def install(data: bytes, target: Path) -> None:
    """Unpack the wheel's uv binary to target, atomically, after checking that it runs."""
    member = f"uv-{VERSION}.data/scripts/uv"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".uv.{os.getpid()}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as wheel, wheel.open(member) as source:
            partial.write_bytes(source.read())
        partial.chmod(0o755)
        check = subprocess.run(
            [str(partial), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        if check.returncode != 0 or not check.stdout.startswith(f"uv {VERSION}"):
            said = (check.stderr or check.stdout).strip().splitlines()
            raise FetchError(f"the fetched uv does not run here: {said[-1] if said else '?'}")
        partial.replace(target)
    except (OSError, KeyError, zipfile.BadZipFile, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"cannot unpack uv into {target.parent}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)


def main() -> int:
    """Print the path of the pinned uv, fetching it first if it is not there yet."""
    target = TOOLS / f"uv-{VERSION}" / "uv"
    try:
        if not os.access(target, os.X_OK):
            wheel = wheel_for_machine()
            index = index_url()
            install(download(index, wheel), target)
    except FetchError as exc:
        print(
            f"hmmirror: cannot fetch uv {VERSION}: {exc}; "
            "install uv (https://docs.astral.sh/uv/) and rerun",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
