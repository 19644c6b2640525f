"""A socket path swapped between bind and chmod: root must not chmod what the swap names.

hmmd (root, or with capabilities) binds its sockets and then gives them their mode and
group. Done by path, that follows a symlink: where another user may write the socket's
directory (a walkthrough's /tmp directory made with ``mkdir -p``), the user can rename a
symlink over the fresh socket in between, and root chmods and chgrps its target (say
/etc/shadow). The race is the user's to win or lose; here the swap is made at the moment
it would have to land, and ``share_with_group`` must refuse it and leave the target alone.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest
from hmmirror.transport.door import share_with_group


def test_a_socket_path_swapped_for_a_symlink_after_bind_is_refused(tmp_path):
    target = tmp_path / "secret"
    target.write_text("root's\n")
    target.chmod(0o600)
    path = str(tmp_path / "door.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
        swap = tmp_path / "swap"
        swap.symlink_to(target)
        os.rename(swap, path)  # what the other user's inotify loop would do
        with pytest.raises(OSError, match="replaced after it was bound"):
            share_with_group(path, "", 0o666)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600, "the symlink's target was chmod'ed"


def test_the_socket_itself_gets_its_mode_and_inode(tmp_path):
    path = str(tmp_path / "door.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
        inode = share_with_group(path, "", 0o660)
        st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert inode == st.st_ino
