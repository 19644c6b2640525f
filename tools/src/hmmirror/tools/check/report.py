"""The checker's report and its entry point: run a check, print what ran and what was found,
as a table or (``hmmctl check -j``) as one JSON object whose keys ``as_dict`` fixes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import IO, Any

from hmmirror.tools.check.runner import Checker, Options, Report
from hmmirror.tools.check.scenarios import SCENARIOS
from hmmirror.tools.progress import Progress


def print_report(report: Report, out: IO[str]) -> None:
    """The closing table: what ran, what was checked, what was found."""
    agents = report.agents

    slowest = max((float(a.get("max_op_s", 0)) for a in agents), default=0.0)

    def total(key: str) -> int:
        return sum(int(a.get(key, 0)) for a in agents)

    ops = sum(report.target_ops.values())
    rows: list[tuple[str, object]] = [
        ("scenario", report.scenario),
        ("seed", report.seed),
        ("elapsed", f"{report.elapsed:.1f} s"),
        ("rounds (quiescent checks)", report.rounds),
        ("target operations", ops),
        ("  by kind", " ".join(f"{k}={v}" for k, v in sorted(report.target_ops.items()))),
        ("agents", len(agents)),
        (
            "device reads / writes / atomics",
            f"{total('reads')} / {total('writes')} / {total('atomics')}",
        ),
        ("  reads served without a task (present pages)", total("quick_reads")),
        ("page faults (calls / pages)", f"{total('page_faults_handled')} / {total('page_faults')}"),
        ("prefetch (calls / pages)", f"{total('prefetches')} / {total('page_prefetch')}"),
        (
            "invalidations (hmmd / agents' zaps)",
            f"{report.hmmd.get('invalidations', '?')} / {total('page_invalidations_handled')}",
        ),
        ("STALE refusals (hmmd)", report.hmmd.get("stale", "?")),
        ("evictions (hmmd)", report.hmmd.get("evictions", "?")),
        ("refused / EBUSY (agents)", f"{total('refused')} / {total('busy')}"),
        ("slowest agent operation", f"{slowest:.3f} s"),
        ("translations checked", report.translations_checked),
        ("READs judged (data oracle)", report.reads_judged),
        ("atomics judged (atomic oracle)", report.atomics_judged),
        ("judged operations, per second", judged_rate(report)),
        ("checker's own CPU", f"{report.checker_cpu_s:.1f} s"),
        ("violations", len(report.violations)),
    ]
    for kind, count in sorted(report.by_kind().items()):
        rows.append((f"  {kind}", count))
    width = max(len(k) for k, _ in rows)
    out.write("\nhmmirror coherence check\n" + "-" * (width + 30) + "\n")
    for key, value in rows:
        out.write(f"{key:<{width}}  {value}\n")
    for note in report.notes:
        out.write(f"note: {note}\n")
    if report.violations:
        out.write(f"replay: hmmctl check --seed {report.seed} --scenario {report.scenario}\n")
    out.flush()


def judged(report: Report) -> int:
    """Every operation the oracles judged: translations, READs and atomics."""
    return report.translations_checked + report.reads_judged + report.atomics_judged


def judged_rate(report: Report) -> str:
    """``judged`` and judged operations per second of the whole run."""
    total = judged(report)
    return f"{total}, {total / report.elapsed:.0f}/s" if report.elapsed > 0 else str(total)


def as_dict(report: Report) -> dict[str, Any]:
    """The report as ``hmmctl check -j`` prints it (keys documented in its ``--help``)."""
    agents = report.agents

    def total(key: str) -> int:
        return sum(int(a.get(key, 0)) for a in agents)

    replay = f"hmmctl check --seed {report.seed} --scenario {report.scenario}"
    return {
        "scenario": report.scenario,
        "seed": report.seed,
        "elapsed_s": round(report.elapsed, 3),
        "rounds": report.rounds,
        "target_ops": dict(sorted(report.target_ops.items())),
        "agents": len(agents),
        "reads": total("reads"),
        "quick_reads": total("quick_reads"),
        "writes": total("writes"),
        "atomics": total("atomics"),
        "page_fault_calls": total("page_faults_handled"),
        "page_faults": total("page_faults"),
        "prefetch_calls": total("prefetches"),
        "page_prefetch": total("page_prefetch"),
        "invalidations": report.hmmd.get("invalidations"),
        "pages_invalidated": total("page_invalidations_handled"),
        "stale": report.hmmd.get("stale"),
        "evictions": report.hmmd.get("evictions"),
        "refused": total("refused"),
        "busy": total("busy"),
        "slowest_op_s": max((float(a.get("max_op_s", 0)) for a in agents), default=0.0),
        "translations_checked": report.translations_checked,
        "reads_judged": report.reads_judged,
        "atomics_judged": report.atomics_judged,
        "judged": judged(report),
        "checker_cpu_s": round(report.checker_cpu_s, 3),
        "violations": [{"kind": kind, "detail": detail} for kind, detail in report.violations],
        "violations_by_kind": dict(sorted(report.by_kind().items())),
        "notes": list(report.notes),
        "logs": report.logs,
        "replay": replay if report.violations else None,
    }


def run_or_stopped(checker: Checker, command: str = "check") -> Report | int:
    """Run ``checker`` on uvloop; its report, or, when SIGINT or SIGTERM ended the run (its
    children are stopped by then), the shell's code for that signal (130, 143), once
    stderr says so and where the logs are."""
    import uvloop

    try:
        return uvloop.run(checker.run())
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
    where = f"; logs kept in {checker.report.logs}" if checker.report.logs else ""
    said = f"stopped by {name}, its hmmd, target and agents too{where}"
    sys.stderr.write(f"hmmctl {command}: {said}\n")
    return 128 + int(signal.Signals[name])


def main(opts: Options, out: IO[str], progress: bool = True, as_json: bool = False) -> int:
    """Run the check and print the report (progress lines too, on stderr under
    ``as_json``; and a progress bar on stderr where it is a terminal, but under
    ``as_json``); 0 if no violation, else 1 (130, 143 if a signal stopped it)."""
    if opts.scenario not in SCENARIOS:
        out.write(f"hmmctl check: no scenario {opts.scenario!r}; try --scenario list\n")
        return 2
    said = (sys.stderr if as_json else out) if progress else None
    # The bar: on stderr where it is a terminal; never under -j (nor -q).
    bar = Progress(sys.stderr, "check", progress and not as_json)
    report = run_or_stopped(Checker(opts, said, bar))
    if isinstance(report, int):
        return report
    if as_json:
        out.write(json.dumps(as_dict(report)) + "\n")
        out.flush()
    else:
        print_report(report, out)
    return 1 if report.violations else 0
