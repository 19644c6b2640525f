"""How much of hmmd's event loop userfaultfd injections may hold (``Injectors.took``).

Injections run on hmmd's loop; a user whose targets make them slow (a signal storm, a
stopped target) must not keep that loop from heartbeats. Past a user's budget within
``SPENT_WINDOW`` s that user's injections pause for ``USER_PAUSE`` s and everyone's for
``ALL_PAUSE`` s; past the budget of all users together, everyone's pause.
"""

from __future__ import annotations

import types

import pytest
from hmmirror.daemon.linux import inject, injector


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The injector module's clock, moved by hand (the module's alone: pytest's stays)."""
    now = [100.0]
    monkeypatch.setattr(injector, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def _paused(budget: injector.Injectors, uid: int) -> bool:
    try:
        budget.check_paused(uid)
    except inject.InjectError as exc:
        assert "paused" in str(exc)
        return True
    return False


def test_a_user_past_its_budget_is_paused_and_others_only_briefly(clock: list[float]) -> None:
    budget = injector.Injectors()
    budget.took(1000, injector.USER_BUDGET / 2)
    assert not _paused(budget, 1000)
    budget.took(1000, injector.USER_BUDGET / 2)
    assert _paused(budget, 1000)
    assert _paused(budget, 1001), "everyone's pause (ALL_PAUSE) did not start"
    clock[0] += injector.ALL_PAUSE
    assert not _paused(budget, 1001)
    assert _paused(budget, 1000), "the user's own pause (USER_PAUSE) ended with everyone's"
    clock[0] += injector.USER_PAUSE - injector.ALL_PAUSE
    assert not _paused(budget, 1000)


def test_users_together_past_the_budget_pause_everyone() -> None:
    budget = injector.Injectors()
    share = injector.ALL_BUDGET / 4
    assert share < injector.USER_BUDGET
    for uid in range(1000, 1004):
        assert not _paused(budget, 2000)
        budget.took(uid, share)
    assert _paused(budget, 2000)


def test_time_spent_longer_ago_than_the_window_is_forgotten(clock: list[float]) -> None:
    budget = injector.Injectors()
    for _ in range(10):
        budget.took(1000, injector.USER_BUDGET * 0.6)
        assert not _paused(budget, 1000)
        clock[0] += injector.SPENT_WINDOW


def test_closing_the_helpers_ends_every_pause() -> None:
    budget = injector.Injectors()
    budget.took(1000, injector.USER_BUDGET)
    assert _paused(budget, 1000)
    budget.close()
    assert not _paused(budget, 1000)
