"""deploy/grafana-hmmirror.json: every expression in it names only metrics hmmd serves.

The served names come from scraping a real hmmd (``--metrics 127.0.0.1:0``);
the dashboard's PromQL is reduced to its identifiers (label matchers, ``by``
clauses, ranges, strings, numbers and Grafana variables taken out), and each
identifier must be a PromQL function or keyword, or a sample name hmmd serves.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hmmirror.client import Access
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-hmmirror.json"
PAGE = 4096
#: PromQL functions, aggregations and keywords the dashboard may use, and Grafana's
#: ``label_values`` (a variable query).
PROMQL = {
    "rate", "irate", "increase", "sum", "avg", "min", "max", "count", "histogram_quantile",
    "by", "without", "on", "ignoring", "time", "clamp_min", "clamp_max", "topk", "label_values",
    "offset", "and", "or", "unless", "abs", "delta", "deriv", "avg_over_time", "max_over_time",
}  # fmt: skip


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, expr)`` for every panel target and every query variable."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            yield f"variable {var['name']}", query["query"] if isinstance(query, dict) else query


def metric_names(expr: str) -> set[str]:
    """The identifiers in ``expr`` that are not PromQL's own."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", "", text)  # numbers
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    # label_values(metric, label): the second argument is a label.
    for label in re.findall(r"label_values\([^,]+,\s*(\w+)\s*\)", expr):
        names.discard(label)
    return names - PROMQL


def test_the_dashboard_parses_as_grafana_json_with_expressions() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    found = list(expressions(dashboard))
    assert len(found) >= 20
    for where, expr in found:
        assert metric_names(expr), f"{where}: no metric in {expr!r}"
    # The check itself catches a misspelt name.
    assert metric_names('rate(hmmirror_invalidation_total{instance=~"$instance"}[5m])') == {
        "hmmirror_invalidation_total"
    }


@pytest.mark.hmmd_args("--metrics", "127.0.0.1:0")
async def test_every_expression_in_the_dashboard_names_a_metric_hmmd_serves(
    hmmd, puppet, agent
) -> None:
    addr = await puppet.mmap(PAGE)
    await puppet.write(addr, b"d" * PAGE)
    async with agent(name="dashboard") as s:
        mirror = await s.mirror(puppet.pid, addr, PAGE, Access.READ)
        await mirror.read(addr, 1)
        await s.sync_range(puppet.pid, addr, addr + PAGE)
        url = str((await s.status())["metrics"])
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
    served = {
        sample.name for family in text_string_to_metric_families(body) for sample in family.samples
    }
    assert "hmmirror_ack_round_trip_seconds_bucket" in served
    wrong = {}
    used: set[str] = set()
    for where, expr in expressions(json.loads(DASHBOARD.read_text())):
        names = metric_names(expr)
        used |= names
        if names - served:
            wrong[where] = sorted(names - served)
    assert not wrong, f"the dashboard names metrics hmmd does not serve: {wrong}"
    # And the dashboard shows every hmmirror metric (a new one needs a panel).
    unused = {
        n for n in served if n.startswith("hmmirror_") and not n.endswith(("_count", "_sum"))
    } - used
    assert not unused, f"hmmd serves metrics no panel shows: {sorted(unused)}"
