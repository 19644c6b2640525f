"""./hmmirror's first step on a stock Debian 12: uv without pip, from a pinned, checked wheel.

Debian's python3 refuses ``pip install --user uv`` (PEP 668), which is how ./hmmirror used to
get uv. Now ``bootstrap/fetch_uv.py`` fetches uv's release wheel with the stdlib and checks it
against a pinned sha256. These tests serve the index on loopback (never PyPI): a fake wheel
whose ``uv`` is a shell stub, pinned in place of the real one, in a copy of the script.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
FETCH_UV = ROOT / "bootstrap" / "fetch_uv.py"
VERSION = "0.13.9"
# The stub stands in for uv: it answers --version and logs every other call beside itself.
STUB = f"""#!/bin/sh
if [ "$1" = --version ]; then echo "uv {VERSION} (stub)"; exit 0; fi
printf '%s|%s\\n' "$*" "${{UV_PYTHON:-}}" >> "${{0%/*}}/calls.log"
"""
WHEEL_PATH = "/packages/{}"


def _wheel(script: str = STUB) -> bytes:
    """A wheel laid out as uv's, whose uv binary is script."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(f"uv-{VERSION}.data/scripts/uv", script)
    return buffer.getvalue()


class Index:
    """A simple package index on loopback, serving what each path maps to."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[str, bytes]] = {}
        self.drip = False  # send a byte a second, forever: a stalled mirror
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            """Answers GET from index.pages."""

            def do_GET(self) -> None:
                """Serve a page, a 404, or a drip."""
                if self.path not in index.pages:
                    self.send_error(404)
                    return
                content_type, body = index.pages[self.path]
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = 1 if index.drip else max(len(body), 1)
                try:
                    for offset in range(0, len(body), step):
                        self.wfile.write(body[offset : offset + step])
                        self.wfile.flush()
                        if index.drip:
                            time.sleep(0.5)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as a stalled download should make it

            def log_message(self, format: str, *args: object) -> None:
                """Keep the test output quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, filename: str, data: bytes, *, html: bool = False) -> None:
        """List filename on the uv page (JSON or HTML, relative link) and serve data there."""
        self.pages[WHEEL_PATH.format(filename)] = ("application/octet-stream", data)
        href = "../../packages/" + filename
        if html:
            page = f'<html><body><a href="{href}#sha256=0">{filename}</a></body></html>'
            self.pages["/simple/uv/"] = ("text/html", page.encode())
        else:
            files = [{"filename": filename, "url": href, "hashes": {}}]
            body = json.dumps({"name": "uv", "files": files}).encode()
            self.pages["/simple/uv/"] = ("application/vnd.pypi.simple.v1+json", body)

    def close(self) -> None:
        """Stop serving and release the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def index() -> Iterator[Index]:
    """A loopback index, closed after the test."""
    served = Index()
    try:
        yield served
    finally:
        served.close()


@pytest.fixture
def fetch_uv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bootstrap/fetch_uv.py as a module, unpacking into tmp_path, no index variable set."""
    spec = importlib.util.spec_from_file_location("fetch_uv", FETCH_UV)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "TOOLS", tmp_path / ".tools")
    for name in module.INDEX_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return module


def _pin(module: ModuleType, monkeypatch: pytest.MonkeyPatch, data: bytes) -> str:
    """Pin data in place of this machine's uv wheel; its file name."""
    filename, _, _ = module.wheel_for_machine()
    pin = (filename, hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setattr(module, "WHEELS", {m: pin for m in module.WHEELS})
    return str(filename)


@pytest.mark.parametrize("html", [False, True], ids=["json-index", "html-index"])
def test_fetch_checks_and_unpacks_the_pinned_wheel(
    fetch_uv: ModuleType,
    index: Index,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    html: bool,
) -> None:
    """From a mirror's JSON or HTML page, with a relative link: the binary lands, runnable."""
    data = _wheel()
    index.publish(_pin(fetch_uv, monkeypatch, data), data, html=html)
    monkeypatch.setenv("PIP_INDEX_URL", index.url.rstrip("/"))
    assert fetch_uv.main() == 0
    target = fetch_uv.TOOLS / f"uv-{VERSION}" / "uv"
    assert capsys.readouterr().out == f"{target}\n"
    assert os.access(target, os.X_OK)
    assert [p.name for p in target.parent.iterdir()] == ["uv"]  # no partial file left
    index.pages.clear()  # a second run fetches nothing
    assert fetch_uv.main() == 0


def test_fetch_refuses_a_wheel_that_is_not_the_pinned_one(
    fetch_uv: ModuleType,
    index: Index,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A mirror serving other bytes under the pinned name gets nothing installed."""
    filename = _pin(fetch_uv, monkeypatch, _wheel())
    evil = _wheel("#!/bin/sh\necho pwned\n")
    index.publish(filename, evil)
    monkeypatch.setenv("UV_INDEX_URL", index.url)
    assert fetch_uv.main() == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hmmirror: cannot fetch uv {VERSION}: ") and err.count("\n") == 1
    assert "expected" in err and "install uv (https://docs.astral.sh/uv/) and rerun" in err
    assert not fetch_uv.TOOLS.exists() or not any(fetch_uv.TOOLS.rglob("uv"))


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("PIP_INDEX_URL", "https://user:secret@127.0.0.1:1/simple", "carries credentials"),
        ("UV_INDEX_URL", "file:///srv/simple", "is not an http(s) URL"),
        ("UV_DEFAULT_INDEX", "http://127.0.0.1:1/simple", "Connection refused"),
    ],
)
def test_fetch_failures_are_one_line(
    fetch_uv: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    said: str,
) -> None:
    """Bad index settings and unreachable indexes: exit 1 and one line saying why."""
    monkeypatch.setenv(variable, value)
    assert fetch_uv.main() == 1
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and "secret" not in err


def test_a_stalled_index_is_given_up_by_the_deadline(
    fetch_uv: ModuleType,
    index: Index,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A byte every half second never trips the socket timeout; the overall deadline does."""
    data = _wheel()
    index.publish(_pin(fetch_uv, monkeypatch, data), data)
    index.drip = True
    monkeypatch.setattr(fetch_uv, "DOWNLOAD_DEADLINE_S", 1.0)
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    start = time.monotonic()
    assert fetch_uv.main() == 1
    assert time.monotonic() - start < 5
    assert "took longer than 1 s" in capsys.readouterr().err


def test_hmmirror_runs_on_debian_python_without_pip_or_uv(tmp_path: Path, index: Index) -> None:
    """``env -i PATH=... ./hmmirror demo`` with no uv anywhere: fetched, synced, run.

    A copy of ./hmmirror (and fetch_uv.py, with the stub's pin) runs with a PATH holding only
    python3, bash and dirname, as on a stock Debian 12. The old script ran
    ``pip install --user uv``, which Debian's python3 refuses (PEP 668), so it never got as far
    as ``uv sync``.
    """
    repo = tmp_path / "repo"
    (repo / "bootstrap").mkdir(parents=True)
    shutil.copy2(ROOT / "hmmirror", repo / "hmmirror")
    data = _wheel()
    if FETCH_UV.exists():
        spec = importlib.util.spec_from_file_location("fetch_uv", FETCH_UV)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        filename, sha256, size = module.wheel_for_machine()
        pinned = FETCH_UV.read_text()
        stub = pinned.replace(sha256, hashlib.sha256(data).hexdigest()).replace(
            f"{size},", f"{len(data)},"
        )
        assert stub != pinned
        (repo / "bootstrap" / "fetch_uv.py").write_text(stub)
        index.publish(filename, data)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    (bin_dir / "python3").symlink_to(python)
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path / "home"), "PIP_INDEX_URL": index.url}
    out = subprocess.run(
        [str(repo / "hmmirror"), "demo", "--duration", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (out.returncode, out.stderr) == (0, ""), out.stdout + out.stderr
    calls = (repo / ".tools" / f"uv-{VERSION}" / "calls.log").read_text().splitlines()
    uv_python = "/usr/bin/python3" if python == "/usr/bin/python3" else ""
    assert calls == [
        f"sync --quiet --frozen|{uv_python}",
        f"run --frozen hmmctl demo --duration 1|{uv_python}",
    ]
