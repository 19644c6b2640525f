"""hmmd's /metrics: names, types, HELP, units, the ack histogram, OpenMetrics, hostile clients.

Every test scrapes a real hmmd started with ``--metrics 127.0.0.1:0``.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from hmmirror.client import Access
from hmmirror.daemon.exposition import FIGURES, UNDESCRIBED
from hmmirror.daemon.metrics import MAX_CONNECTIONS, MAX_REQUEST, REQUEST_DEADLINE, MetricsServer
from hmmirror.proto.ackbuckets import BOUNDS_S
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

PAGE = 4096
pytestmark = pytest.mark.hmmd_args("--metrics", "127.0.0.1:0")

#: What Prometheus 3 sends (its default scrape_protocols, in order of preference).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


async def http(
    url: str, request: bytes | None = None, accept: str = ""
) -> tuple[str, dict[str, str], str]:
    """One raw HTTP exchange with hmmd: (status line, headers, body)."""
    host, _, rest = url.removeprefix("http://").partition(":")
    port = int(rest.split("/", 1)[0])
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        if request is None:
            extra = f"Accept: {accept}\r\n" if accept else ""
            request = f"GET /metrics HTTP/1.1\r\nHost: hmmd\r\n{extra}\r\n".encode()
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


async def busy_hmmd(puppet: Any, agent: Any, rounds: int = 5) -> tuple[dict[str, Any], str]:
    """Run ``rounds`` invalidation round trips on one mirror; return (status, metrics url)."""
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"m" * PAGE)
    async with agent(name="metrics") as s:
        mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        for _ in range(rounds):
            await mirror.read(addr, 1)
            await s.sync_range(puppet.pid, addr, addr + PAGE)
        status = await s.status()
    return status, str(status["metrics"])


async def test_every_metric_has_help_and_type_counters_end_in_total_units_are_base(
    hmmd, puppet, agent
):
    status, url = await busy_hmmd(puppet, agent)
    line, headers, body = await http(url)
    assert line == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for line_ in body.splitlines():  # HELP and TYPE before every family, in the text itself
        if line_ and not line_.startswith("#"):
            sample = line_.split("{")[0].split()[0]
            assert any(sample.startswith(n) for n in families), sample
    helps = {ln.split()[2] for ln in body.splitlines() if ln.startswith("# HELP ")}
    types = {ln.split()[2]: ln.split()[3] for ln in body.splitlines() if ln.startswith("# TYPE ")}
    assert helps == set(types), "a family without HELP or TYPE"
    for name, family in families.items():
        assert family.documentation, name
        assert family.documentation != UNDESCRIBED, (
            f"status figure {name} is not described in hmmirror.daemon.exposition.FIGURES"
        )
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family
            assert types[name + "_total"] == "counter"
        assert not name.endswith(("_us", "_ms", "_s", "_monotonic")), f"{name}: not a base unit"
        assert not any(bad in name for bad in ("pid", "zero_pfn", "epoch", "uptime")), name
    assert "zero_pfn" not in body and "monotonic" not in body

    # hmmd's figures, by name and type, with the values status gives.
    for key, figure in FIGURES.items():
        family = families["hmmirror_" + figure.name]
        assert family.type == ("counter" if figure.counter else "gauge"), key
        if key in ("invalidations", "registrations", "faults"):
            assert family.samples[0].value == status[key], key
    assert families["hmmirror_mirrors"].samples[0].value == 0  # the session has closed
    assert families["hmmirror_invalidations"].samples[0].value == 5
    assert families["hmmirror_watch_lag_seconds"].type == "gauge"
    assert families["hmmirror_reply_bytes"].type == "gauge"
    # prometheus_client's process metrics, hmmd's own build info.
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds"):  # fmt: skip
        assert name in families, name
    assert families["hmmirror_build_info"].type == "gauge"  # info, in the 0.0.4 format
    build = families["hmmirror_build_info"].samples[0]
    version = subprocess.run(
        [sys.executable, "-m", "hmmirror.daemon", "--version"], capture_output=True, text=True
    ).stdout.split()
    assert build.name == "hmmirror_build_info" and build.value == 1
    assert build.labels == {"version": version[1].rstrip(","), "protocol": version[-1]}


async def test_the_ack_round_trip_is_a_histogram_in_seconds_counting_every_ack(hmmd, puppet, agent):
    status, url = await busy_hmmd(puppet, agent, rounds=7)
    _, _, body = await http(url)
    family = {f.name: f for f in text_string_to_metric_families(body)}[
        "hmmirror_ack_round_trip_seconds"
    ]
    assert family.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
    assert [float(le) for le, _ in buckets] == [*BOUNDS_S, float("inf")]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    count = next(s.value for s in family.samples if s.name.endswith("_count"))
    total = next(s.value for s in family.samples if s.name.endswith("_sum"))
    assert count == counts[-1] == status["ack_samples"] == 7
    # The sum is in seconds: 7 local round trips take well under a second, more than 7 µs.
    assert 7e-6 < total < 1.0
    # No ring percentiles any more: the histogram replaces them.
    assert "ack_p99" not in body and "ack_samples" not in body
    # Cumulative since the start: a second scrape after more acks only grows.
    await busy_hmmd(puppet, agent, rounds=2)
    _, _, again = await http(url)
    later = {f.name: f for f in text_string_to_metric_families(again)}
    after = next(
        s.value
        for s in later["hmmirror_ack_round_trip_seconds"].samples
        if s.name.endswith("_count")
    )
    assert after == 9


@pytest.mark.parametrize(
    "accept",
    ["application/openmetrics-text; version=1.0.0; charset=utf-8", PROMETHEUS_ACCEPT],
)
async def test_openmetrics_is_served_to_who_asks_for_it(hmmd, puppet, agent, accept):
    _, url = await busy_hmmd(puppet, agent, rounds=1)
    line, headers, body = await http(url, accept=accept)
    assert line == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(body)}  # the strict parser accepts it
    assert families["hmmirror_invalidations"].type == "counter"
    assert families["hmmirror_build"].type == "info"
    assert families["hmmirror_ack_round_trip_seconds"].unit == "seconds"
    assert families["hmmirror_watch_lag_seconds"].unit == "seconds"
    assert families["hmmirror_reply_bytes"].unit == "bytes"
    # Without the header, the classic text format.
    _, plain, text = await http(url)
    assert plain["content-type"].startswith("text/plain; version=0.0.4")
    assert "# EOF" not in text


async def test_a_hostile_scraper_holds_neither_hmmd_nor_the_endpoint(hmmd, puppet, agent):
    _, url = await busy_hmmd(puppet, agent, rounds=1)
    host, _, rest = url.removeprefix("http://").partition(":")
    port = int(rest.split("/", 1)[0])
    # A request head over the cap is refused, not buffered.
    line, _, body = await http(
        url, b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"x" * (2 * MAX_REQUEST) + b"\r\n\r\n"
    )
    assert line == "HTTP/1.1 400 Bad Request" and "too large" in body
    # Anything but GET /metrics is a 404.
    line, _, _ = await http(url, b"POST /metrics HTTP/1.1\r\n\r\n")
    assert line == "HTTP/1.1 404 Not Found"
    # Slow clients that never finish their request: more than hmmd serves at once.
    t0 = time.monotonic()
    idle = [await asyncio.open_connection(host, port) for _ in range(MAX_CONNECTIONS + 4)]
    for _, w in idle:
        w.write(b"GET /metrics HTTP/1.1\r\n")  # ...and no end of head
    async with agent(name="meanwhile") as s:  # hmmd's loop goes on serving agents
        assert (await s.status())["sessions"] == 1
    # Past the cap, a scraper is turned away at once; hmmd closes the slow ones at the
    # deadline, and then serves again.
    extra, _ = idle[-1]
    assert await asyncio.wait_for(extra.read(), 1) == b""
    for r, _ in idle[:MAX_CONNECTIONS]:
        assert await asyncio.wait_for(r.read(), REQUEST_DEADLINE + 3) == b""
    assert time.monotonic() - t0 < REQUEST_DEADLINE + 3
    for _, w in idle:
        w.close()
    line, _, body = await http(url)
    assert line == "HTTP/1.1 200 OK" and "hmmirror_sessions" in body


@pytest.mark.parametrize(
    "accept",
    ["text/plain; version=x", "application/openmetrics-text; version=2.\nX-Forged: yes"],
)
async def test_a_scrapers_accept_header_neither_breaks_nor_writes_the_answer(
    hmmd, puppet, agent, accept
):
    """prometheus_client raised TypeError on a version it cannot compare (the request went
    unanswered, and hmmd logged a traceback for it), and copied any other version, a bare
    newline included, into the answer's Content-Type, where it became a header of its own.
    Both now get the plain text format."""
    _, url = await busy_hmmd(puppet, agent, rounds=1)
    line, headers, body = await http(url, accept=accept)
    assert line == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    assert "x-forged" not in headers, headers
    assert "hmmirror_sessions" in body
    assert "Traceback" not in hmmd.stderr() and "never retrieved" not in hmmd.stderr()


async def test_an_ipv6_address_in_brackets_is_served() -> None:
    """``metrics = "[::1]:9464"``, as URLs write an IPv6 address, failed hmmd's start."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:  # a host without IPv6 loopback cannot serve it at all
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server = MetricsServer(lambda: {})
    await server.start("[::1]:0")
    try:
        assert server.url.startswith("http://[::1]:"), server.url
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        reader, writer = await asyncio.open_connection("::1", port)
        writer.write(b"GET /nothing HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 404")
        writer.close()
    finally:
        server.close()
