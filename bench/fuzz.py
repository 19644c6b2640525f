"""Coverage-guided fuzzing of hmmirror's wire decoder with atheris (libFuzzer).

``uv run python bench/fuzz.py --seconds 60`` fuzzes ``hmmirror.proto.codec.decode``
for that long and prints a summary: executions, corpus size (seeds and new
inputs), coverage, crashes. Exit status 0 means no crash; 1 means a crash (its
input is saved and the traceback printed); 2 means the fuzzer could not run.

The property checked on every input, besides "no exception but ``ProtocolError``":
a ``ProtocolError`` has one of the four typed classes and the code of its class;
whatever ``decode`` accepts satisfies the field specs, its bulk frames have the
declared sizes, and it re-encodes to bytes that decode to the same encoding.

One fuzz input is one multipart message: each frame is a little-endian u16
length and that many bytes; bytes left over after the last whole frame are one
more frame. The seed corpus is real encoded messages, one or more of every type
in ``ALL_MESSAGES``, written in that format into the corpus directory; a
libFuzzer dictionary of the type names, field names and msgpack map markers
goes next to it.

The run is two processes: this driver, and a worker (``--worker``) that is
atheris itself. libFuzzer ends the worker with ``exit()`` once
``-max_total_time`` is reached, so the driver reads the worker's final
statistics (``-print_final_stats=1``) from its stderr, counts the corpus, and
looks for crash artifacts. The driver kills the worker if it overstays its
time by 60 s.

Other modes: ``--reproduce FILE`` runs the checks on one saved input and shows
the traceback; ``--plant-bug`` makes the target raise on any accepted ``ack``
(a self-test: the run must then report a crash).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Bytes of the length prefix of one frame in a fuzz input.
LEN = struct.Struct("<H")
#: libFuzzer's -max_len: large enough for the seeds with two pages of bulk data.
MAX_LEN = 1 << 15
#: How long past ``--seconds`` the driver waits before it kills the worker.
GRACE = 60.0


# --- the input format -----------------------------------------------------------------------


def split_frames(data: bytes) -> list[bytes]:
    """One fuzz input as frames: u16 length-prefixed frames, the remainder one more frame."""
    frames: list[bytes] = []
    pos = 0
    while pos + LEN.size <= len(data):
        (n,) = LEN.unpack_from(data, pos)
        if pos + LEN.size + n > len(data):
            break
        frames.append(data[pos + LEN.size : pos + LEN.size + n])
        pos += LEN.size + n
    if pos < len(data):
        frames.append(data[pos:])
    return frames


def join_frames(frames: Sequence[Any]) -> bytes:
    """The fuzz input that ``split_frames`` turns back into ``frames``."""
    out = bytearray()
    for frame in frames:
        raw = memoryview(frame).cast("B").tobytes()
        if len(raw) > 0xFFFF:
            raise ValueError(f"seed frame of {len(raw)} bytes exceeds the u16 length prefix")
        out += LEN.pack(len(raw)) + raw
    return bytes(out)


# --- seeds and dictionary -------------------------------------------------------------------


def seed_messages() -> list[list[Any]]:
    """Real encoded messages: every type at small and at edge values, and the fast encoders."""
    import msgpack
    from hmmirror.proto import messages as M
    from hmmirror.proto.codec import encode, encode_ack, encode_invalidate
    from hmmirror.proto.schema import U64_MAX, Kind

    def values(cls: type[M.Message], edge: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            spec = f.metadata["wire"]
            kind = spec.kind
            if kind is Kind.UINT:
                if f.name in ("npages", "length", "count"):
                    out[f.name] = min(spec.max, 2)  # sizes the bulk frames: keep seeds small
                else:
                    out[f.name] = spec.max if edge else min(spec.max, 4096)
            elif kind is Kind.BOOL:
                out[f.name] = edge
            elif kind is Kind.STR:
                out[f.name] = "\u00e9" * min(spec.max, 8) if edge else "agent-1"
            elif kind is Kind.UINTS:
                out[f.name] = (0, 1, U64_MAX) if edge else (1, 2)
            elif kind is Kind.INTERVALS:
                out[f.name] = ((4096, 1 << 47), (U64_MAX - 1, U64_MAX)) if edge else ((0, 4096),)
            elif kind is Kind.ITEMS:
                out[f.name] = ((1, 0, 4096, 0), (U64_MAX,) * 4) if edge else ((1, 0, 4096, 1),)
            elif kind is Kind.STATS:
                out[f.name] = {"epoch": "ab", "x": 1.5, "n": -3} if edge else {"sessions": 1}
        return out

    seeds: list[list[Any]] = []
    for cls in M.ALL_MESSAGES:
        for edge in (False, True):
            msg = cls(**values(cls, edge))
            bulk = [bytes(range(256)) * (n // 256) + bytes(n % 256) for n in msg.bulk_sizes()]
            seeds.append(encode(msg, id=U64_MAX if edge else 7, re=1 if edge else 0, bulk=bulk))
    seeds.append(encode_ack(3, 9))
    seeds.append(encode_invalidate(4, 2, msgpack.packb([[1, 0, 8192, 0]]), 10))
    two = msgpack.packb([[1, 0, 8192, 0], [3, 0, 4096, 0]])
    seeds.append(encode_invalidate(5, 2, two, 11, msgpack.packb([2, 3])))
    return seeds


def dictionary_entries() -> list[bytes]:
    """libFuzzer dictionary tokens: type and field names as msgpack strings, and map markers."""
    import msgpack
    from hmmirror.proto import messages as M

    words: set[bytes] = {msgpack.packb(w) for w in ("v", "type", "id", "re")}
    for cls in M.ALL_MESSAGES:
        words.add(msgpack.packb(cls.TYPE))
        words.update(msgpack.packb(f.name) for f in dataclasses.fields(cls))
    words.update({b"\x92\x01\x00", b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xc3", b"\xc2"})
    return sorted(words)


def write_seeds(corpus: Path, dict_path: Path) -> int:
    """Write the seed corpus and the dictionary; return the number of seeds."""
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = seed_messages()
    for i, frames in enumerate(seeds):
        (corpus / f"seed-{i:03d}").write_bytes(join_frames(frames))
    with dict_path.open("w") as f:
        for word in dictionary_entries():
            f.write('"' + "".join(f"\\x{b:02x}" for b in word) + '"\n')
    return len(seeds)


# --- the target -----------------------------------------------------------------------------


class FuzzTarget:
    """The checks run on every input; ``tally`` counts outcomes by class name."""

    def __init__(self, plant_bug: bool = False) -> None:
        from hmmirror.proto import codec, errors, messages, schema

        self.codec, self.errors, self.messages, self.schema = codec, errors, messages, schema
        E = errors
        self.codes = {
            E.DecodeError: E.ErrorCode.BAD_MESSAGE,
            E.TooLarge: E.ErrorCode.TOO_LARGE,
            E.VersionError: E.ErrorCode.VERSION_MISMATCH,
            E.UnknownMessage: E.ErrorCode.UNKNOWN_MESSAGE,
        }
        self.plant_bug = plant_bug
        self.tally: dict[str, int] = {}

    def __call__(self, data: bytes) -> None:
        """Decode one input and check the outcome; raise AssertionError on a violation."""
        frames = split_frames(data)
        try:
            env = self.codec.decode(frames)
        except self.errors.ProtocolError as exc:
            kind = type(exc)
            self.tally[kind.__name__] = self.tally.get(kind.__name__, 0) + 1
            if kind not in self.codes or exc.code != self.codes[kind] or not str(exc):
                raise AssertionError(f"malformed ProtocolError {kind.__name__}: {exc!r}") from exc
            return
        self.tally["accepted"] = self.tally.get("accepted", 0) + 1
        self.check_accepted(env)

    def check_accepted(self, env: Any) -> None:
        """The accepted message obeys its specs and re-encodes canonically."""
        Kind, U64_MAX = self.schema.Kind, self.schema.U64_MAX
        msg = env.msg
        cls = type(msg)
        if self.messages.TYPES.get(env.type) is not cls:
            raise AssertionError(f"type {env.type!r} decoded as {cls.__name__}")
        for f in dataclasses.fields(cls):
            spec, value = f.metadata["wire"], getattr(msg, f.name)
            ok = True
            if spec.kind is Kind.UINT:
                ok = type(value) is int and 0 <= value <= spec.max
            elif spec.kind is Kind.BOOL:
                ok = type(value) is bool
            elif spec.kind is Kind.STR:
                ok = type(value) is str and len(value) <= spec.max
            elif spec.kind is Kind.INTERVALS:
                ok = len(value) <= spec.max and all(
                    type(a) is int and type(b) is int and 0 <= a < b <= U64_MAX for a, b in value
                )
            elif spec.kind in (Kind.UINTS, Kind.ITEMS):
                flat = value if spec.kind is Kind.UINTS else [v for it in value for v in it]
                ok = len(value) <= spec.max and all(
                    type(v) is int and 0 <= v <= U64_MAX for v in flat
                )
                if spec.kind is Kind.ITEMS:
                    ok = ok and all(len(it) == 4 for it in value)
            elif spec.kind is Kind.STATS:
                ok = type(value) is dict and len(value) <= spec.max
            if not ok:
                raise AssertionError(f"{env.type}.{f.name} = {value!r} violates {spec}")
        if [b.nbytes for b in env.bulk] != list(msg.bulk_sizes()):
            raise AssertionError(f"{env.type} bulk sizes {[b.nbytes for b in env.bulk]}")
        frames = self.codec.encode(msg, id=env.id, re=env.re, bulk=env.bulk)
        again = self.codec.decode([bytes(f) for f in frames])
        redone = self.codec.encode(again.msg, id=again.id, re=again.re, bulk=again.bulk)
        if [bytes(f) for f in redone] != [bytes(f) for f in frames]:
            raise AssertionError(f"{env.type} does not re-encode canonically")
        if self.plant_bug and env.type == "ack":
            raise RuntimeError("planted bug: an accepted ack (--plant-bug self-test)")


# --- the worker: atheris in this process ----------------------------------------------------


def worker(args: argparse.Namespace, libfuzzer_args: list[str]) -> None:
    """Instrument hmmirror.proto, then hand control to libFuzzer (never returns)."""
    try:
        import atheris
    except ImportError as exc:
        print(f"fuzz: atheris is not installed ({exc}); run `uv sync`", file=sys.stderr)
        sys.exit(2)
    with atheris.instrument_imports(include=["hmmirror.proto"]):
        import hmmirror.proto.codec
        import hmmirror.proto.schema  # noqa: F401
    target = FuzzTarget(plant_bug=args.plant_bug)
    tally_path = args.tally
    every = 20_000
    count = [0]

    def one_input(data: bytes) -> None:
        target(data)
        count[0] += 1
        if tally_path and count[0] % every == 0:
            Path(tally_path).write_text(json.dumps({"inputs": count[0], **target.tally}))

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


# --- the driver -----------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    """What one run found."""

    seconds: float
    executions: int
    execs_per_s: int
    seeds: int
    corpus: int
    new_units: int
    coverage: int
    features: int
    crashes: int
    crash_files: list[str]
    exit_status: int
    tally: dict[str, int]

    def text(self) -> str:
        """The human summary."""
        lines = [
            f"fuzz summary: {self.seconds:.0f} s, {self.executions:,} executions "
            f"({self.execs_per_s:,}/s)",
            f"  corpus: {self.corpus} inputs at the end, from {self.seeds} seeds; "
            f"{self.new_units} new inputs found new coverage (libFuzzer keeps the smallest)",
            f"  coverage: {self.coverage} edges, {self.features} features "
            "(instrumented: hmmirror.proto)",
            f"  crashes: {self.crashes}" + (f"  {self.crash_files}" if self.crash_files else ""),
        ]
        if self.tally:
            total = max(1, self.tally.get("inputs", 0))
            shares = sorted((k, v) for k, v in self.tally.items() if k != "inputs")
            parts = ", ".join(f"{k} {v * 100 / total:.1f}%" for k, v in shares)
            lines.append(f"  outcomes over the first {total:,} inputs: {parts}")
        return "\n".join(lines)


def _stat(log: str, name: str) -> int:
    """A ``stat::NAME: N`` line of libFuzzer's final statistics (0 if absent)."""
    found = re.findall(rf"stat::{name}:\s+(\d+)", log)
    return int(found[-1]) if found else 0


def _last_progress(log: str, key: str) -> int:
    """The last ``KEY: N`` in libFuzzer's progress lines (cov, ft, corp)."""
    found = re.findall(rf"\b{key}: (\d+)", log)
    return int(found[-1]) if found else 0


def drive(args: argparse.Namespace) -> int:
    """Seed, run the worker for ``--seconds``, and print the summary."""
    work = Path(tempfile.mkdtemp(prefix="hmmfuzz-"))
    corpus = Path(args.corpus) if args.corpus else work / "corpus"
    artifacts = Path(args.artifacts) if args.artifacts else work / "crashes"
    artifacts.mkdir(parents=True, exist_ok=True)
    dict_path = work / "hmmirror.dict"
    seeds = write_seeds(corpus, dict_path)
    tally_path = work / "tally.json"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--tally",
        str(tally_path),
        *(["--plant-bug"] if args.plant_bug else []),
        "--",
        f"-max_total_time={args.seconds}",
        f"-max_len={MAX_LEN}",
        f"-dict={dict_path}",
        f"-artifact_prefix={artifacts}/",
        f"-seed={args.seed}",
        "-print_final_stats=1",
        "-timeout=10",
        "-rss_limit_mb=2048",
        str(corpus),
    ]
    started = time.monotonic()
    log_path = work / "libfuzzer.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            rc = proc.wait(timeout=args.seconds + GRACE)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            rc = -signal.SIGKILL
    elapsed = time.monotonic() - started
    log = log_path.read_text(errors="replace")
    crash_files = sorted(
        str(p) for p in artifacts.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))
    )
    tally: dict[str, int] = {}
    if tally_path.exists():
        tally = json.loads(tally_path.read_text())
    summary = Summary(
        seconds=elapsed,
        executions=_stat(log, "number_of_executed_units"),
        execs_per_s=_stat(log, "average_exec_per_sec"),
        seeds=seeds,
        corpus=_last_progress(log, "corp") or sum(1 for _ in corpus.iterdir()),
        new_units=_stat(log, "new_units_added"),
        coverage=_last_progress(log, "cov"),
        features=_last_progress(log, "ft"),
        crashes=len(crash_files),
        crash_files=crash_files,
        exit_status=rc,
        tally=tally,
    )
    if crash_files or rc != 0 or args.verbose:
        tail = log.splitlines()[-60:]
        print("--- libFuzzer output (last 60 lines) ---", *tail, "---", sep="\n")
    print(summary.text())
    if args.json:
        print("FUZZ-JSON " + json.dumps(dataclasses.asdict(summary)))
    if crash_files:
        print(f"reproduce: uv run python bench/fuzz.py --reproduce {crash_files[0]}")
    if not args.corpus:
        # Crash inputs are kept (they are the evidence); the rest is thrown away.
        keep = crash_files and not args.artifacts
        shutil.rmtree(corpus, ignore_errors=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if crash_files:
        return 1
    if rc != 0 or summary.executions == 0:
        print(f"fuzz: the worker exited with {rc} after {summary.executions} executions")
        return 2
    return 0


def reproduce(path: str, plant_bug: bool = False) -> int:
    """Run the checks on one saved input; print the frames and any traceback."""
    data = Path(path).read_bytes()
    frames = split_frames(data)
    print(f"{path}: {len(data)} bytes, {len(frames)} frames: {[f[:40] for f in frames]}")
    FuzzTarget(plant_bug=plant_bug)(data)
    print("no failure: the checks pass on this input (was the bug fixed?)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the driver, the worker or a reproduction."""
    argv = list(sys.argv[1:] if argv is None else argv)
    libfuzzer_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, libfuzzer_args = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(prog="bench/fuzz.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed (default 1)")
    ap.add_argument("--corpus", help="keep the corpus in this directory (default: a temp dir)")
    ap.add_argument("--artifacts", help="where crash inputs go (default: a temp dir, kept)")
    ap.add_argument("--json", action="store_true", help="also print the summary as JSON")
    ap.add_argument("--verbose", action="store_true", help="show libFuzzer's output")
    ap.add_argument("--plant-bug", action="store_true", help="self-test: crash on any ack")
    ap.add_argument("--reproduce", metavar="FILE", help="run the checks on one saved input")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tally", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seconds < 1:
        ap.error("--seconds must be at least 1")
    if args.worker:
        worker(args, libfuzzer_args)
        return 0
    if args.reproduce:
        return reproduce(args.reproduce, args.plant_bug)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
