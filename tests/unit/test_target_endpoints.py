"""Which hmmds a target speaks to (``hmmirror.client.target.endpoints_of``) and what a
``moved:`` refusal of the uffd intake names (``hmmirror.proto.intake``)."""

from __future__ import annotations

import pytest
from hmmirror.client.target import DEFAULT_ENDPOINT, endpoints_of
from hmmirror.proto.intake import moved, moved_owner


def test_one_endpoint_a_comma_separated_list_or_a_sequence(monkeypatch):
    monkeypatch.delenv("HMMIRROR_ENDPOINT", raising=False)
    assert endpoints_of("ipc:///a.sock") == ["ipc:///a.sock"]
    assert endpoints_of("ipc:///a.sock, ipc:///b.sock") == ["ipc:///a.sock", "ipc:///b.sock"]
    assert endpoints_of(("ipc:///b.sock", "ipc:///a.sock")) == ["ipc:///b.sock", "ipc:///a.sock"]
    assert endpoints_of(None) == endpoints_of("") == [DEFAULT_ENDPOINT]
    monkeypatch.setenv("HMMIRROR_ENDPOINT", "ipc:///a.sock,ipc:///c.sock")
    assert endpoints_of(None) == ["ipc:///a.sock", "ipc:///c.sock"]


@pytest.mark.parametrize("named", ["ipc:///a.sock,ipc:///a.sock", "ipc:///a.sock,", ()])
def test_an_empty_or_repeated_endpoint_is_refused(named):
    with pytest.raises(ValueError, match="distinct and not empty"):
        endpoints_of(named)


def test_a_moved_refusal_names_its_owner_and_no_other_refusal_does():
    assert moved_owner(moved("tcp://10.231.0.2:7000")) == "tcp://10.231.0.2:7000"
    assert moved_owner("moved:") is None
    assert moved_owner("busy: too many connections waiting") is None
    assert moved_owner("process 12 is gone") is None
