"""The pytest plugin works for a user: a test file outside the repository, using only the
``hmmirror.testing`` fixtures, passes when pytest runs it in an empty folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

USER_TEST = textwrap.dedent(
    """
    import pytest

    @pytest.mark.multinode
    def test_my_device_sees_my_app(hmmirror_network, hmmirror_target):
        net = hmmirror_network(hosts=2)
        app = hmmirror_target(npages=2, fill=b"U")
        nic = net.agent(net.hosts[1], "nic0", app.pid, app.addr, 2)
        assert nic.ask("read")["pages"] == ["55" * 16] * 2
        app.dontneed(0, 4096)
        app.write(0, b"V" * 4096)
        nic.until(lambda s: s["events"], "the invalidation")
        assert nic.ask("read")["pages"] == ["56" * 16, "55" * 16]
    """
)


@pytest.mark.multinode
def test_a_users_own_test_file_passes_with_the_plugin_fixtures(tmp_path):
    (tmp_path / "test_mine.py").write_text(USER_TEST)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
