"""Give every ZeroMQ context of the run, the raw baselines' too, hmmirror's thread policy.

hmmirror's contexts run libzmq's threads under SCHED_BATCH (``transport.sockets.context``);
the raw baselines keep libzmq's default. To see how much of a ratio is that policy, run the
bench with this directory first on the path, so that Python imports this module at start-up
in the bench and in every process it starts:

    PYTHONPATH=bench/same_policy python -m bench --only invalidate --only pipelined --only rdma

bench/README.md §1 ("libzmq's threads") has the figures.
"""

from __future__ import annotations

import contextlib
from typing import Any

try:
    import zmq
    from hmmirror.transport.sockets import IO_THREAD_POLICY
except ImportError:  # a process without pyzmq or hmmirror: nothing to change
    pass
else:
    _init = zmq.Context.__init__

    def _with_policy(self: zmq.Context[Any], *args: Any, **kwargs: Any) -> None:
        """``zmq.Context.__init__``, then hmmirror's thread policy (before any socket)."""
        _init(self, *args, **kwargs)
        with contextlib.suppress(zmq.ZMQError):
            self.set(zmq.THREAD_SCHED_POLICY, IO_THREAD_POLICY)

    zmq.Context.__init__ = _with_policy  # type: ignore[method-assign]
