"""The coherence checker behind ``hmmctl check``: a seeded workload judged by two oracles.

>>> report = asyncio.run(Checker(Options(seed=3, duration=8, agents=3)).run())
>>> assert not report.violations

``check.target`` is the stamped target process, ``check.agent`` the agent
process, ``check.stamps`` the log formats and the data oracle, ``check.runner``
the run, ``check.scenarios`` the fault-injection ``SCENARIOS`` and ``check.report``
the report and the entry point.
"""

from hmmirror.tools.check.report import print_report
from hmmirror.tools.check.runner import Checker, Options, Report
from hmmirror.tools.check.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "Checker", "Options", "Report", "print_report"]
