"""Multi-node: hmmd in host A, agents in hosts B and C, over CURVE on a real bridge.

These tests use only the public pytest plugin (``hmmirror_network``; targets run
in host A next to hmmd), exactly as a user's own integration tests would. Hosts are
network namespaces whose 10.231.0.0/24 addresses exist only inside them; the
fixtures remove them all, whatever happens.
"""

from __future__ import annotations

import signal
import time

import pytest

pytestmark = pytest.mark.multinode
PAGE = 4096


def test_agent_in_b_mirrors_a_target_in_a_over_curve(hmmirror_network):
    net = hmmirror_network(hosts=2)
    target = net.target(npages=2, fill=b"A")
    agent = net.agent(net.hosts[1], "b", target.pid, target.addr, 2)
    read = agent.ask("read")
    assert read["pages"] == ["41" * 16] * 2 and read["faults"] >= 1
    target.dontneed(0, PAGE)
    target.write(0, b"B" * PAGE)
    state = agent.until(lambda s: s["events"], "an invalidation reaching host B")
    assert state["events"][0][0] == target.addr
    assert agent.ask("read")["pages"] == ["42" * 16, "41" * 16]


def test_a_cut_link_evicts_b_after_its_deadline_c_carries_on_b_comes_back_fresh(hmmirror_network):
    net = hmmirror_network(hosts=3)
    _, b, c = net.hosts
    target = net.target(npages=1, fill=b"A")
    agent_b = net.agent(b, "b", target.pid, target.addr, 1)
    agent_c = net.agent(c, "c", target.pid, target.addr, 1)
    assert agent_b.ask("read")["pages"] == agent_c.ask("read")["pages"] == ["41" * 16]
    before = agent_b.ask("state")

    b.cut()
    target.dontneed(0, PAGE)
    target.write(0, b"C" * PAGE)
    t0 = time.monotonic()
    # C is told at once; its read of the page waits only until the invalidation completes,
    # which B's 1 s ack deadline bounds.
    agent_c.until(lambda s: s["events"], "C's invalidation", deadline=3)
    assert agent_c.ask("read")["pages"] == ["43" * 16]
    assert time.monotonic() - t0 < 5

    b.heal()
    # B's session was fenced or lost while cut: it comes back under a fresh one, holding
    # nothing, registers again on its own, and never reads through the old entry.
    state = agent_b.until(lambda s: s["dropped"] and not s["lost"], "B noticing")
    assert state["held"] == 0
    assert agent_b.ask("read")["pages"] == ["43" * 16]
    after = agent_b.ask("state")
    assert after["mirror"] != before["mirror"]
    assert after["epoch"] == before["epoch"], "hmmd did not restart: the session is new"


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_a_stopped_or_killed_agent_is_evicted_at_its_deadline_and_c_carries_on(
    hmmirror_network, sig
):
    net = hmmirror_network(hosts=3)
    _, b, c = net.hosts
    target = net.target(npages=1, fill=b"A")
    agent_b = net.agent(b, "b", target.pid, target.addr, 1)
    agent_c = net.agent(c, "c", target.pid, target.addr, 1)
    assert agent_b.ask("read")["pages"] == agent_c.ask("read")["pages"] == ["41" * 16]
    agent_b.signal(sig)
    target.dontneed(0, PAGE)
    target.write(0, b"D" * PAGE)
    t0 = time.monotonic()
    agent_c.until(lambda s: s["events"], "C's invalidation", deadline=3)
    assert agent_c.ask("read")["pages"] == ["44" * 16]
    assert time.monotonic() - t0 < 5, "B blocked C for longer than its deadline"
    if sig == signal.SIGSTOP:
        agent_b.signal(signal.SIGCONT)
        state = agent_b.until(lambda s: s["dropped"], "B noticing its eviction")
        assert state["held"] == 0
        assert agent_b.ask("read")["pages"] == ["44" * 16]


def test_after_an_hmmd_restart_agents_see_a_new_epoch_and_re_register(hmmirror_network):
    net = hmmirror_network(hosts=2)
    target = net.target(npages=1, fill=b"A")
    agent = net.agent(net.hosts[1], "b", target.pid, target.addr, 1)
    epoch = agent.ready["epoch"]
    assert agent.ask("read")["pages"] == ["41" * 16]
    endpoint = net.endpoint
    net.kill_daemon()
    target.write(0, b"E" * PAGE)
    net.start_daemon(port=endpoint.rsplit(":", 1)[1])
    assert net.endpoint == endpoint
    state = agent.until(
        lambda s: s["epoch"] != epoch and not s["lost"], "the agent's session with the new hmmd"
    )
    assert state["held"] == 0, "nothing survives a restart"
    assert agent.ask("read")["pages"] == ["45" * 16]
