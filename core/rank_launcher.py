"""``squeeze quantize --workers N``: N local ranks of one quantization, started and watched from here.

``launch_workers(job)`` starts N children (``python -m core.rank_launcher``) with the environment
torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT on this
machine, OMP_NUM_THREADS = cores / N) and the job as JSON; each runs ``run_quantize_job`` as one rank
(``core.distributed``). Rank 0 sends its progress events and the final report back as JSON lines on
its stdout, so this generator looks like ``run_quantize_job`` itself to the command line and the
studio. The children's stderr goes to log files; when one fails, the others are stopped and one
UserError says which worker and why (its own error line, or the signal that killed it and the last
lines it wrote to stderr), and that the finished blocks are kept for a rerun. Closing the generator
(Ctrl-C, the studio's Cancel) interrupts every child as Ctrl-C would one process. A child whose
parent dies stops by itself.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Generator
from pathlib import Path

from core.distributed import EXIT_RANK_LOST
from core.errors import UserError
from core.progress import ProgressEvent

JOB_ENV = "SQUEEZE_JOB"
STOP_GRACE_S = 3.0  # a stopped child gets this long to clean up, then SIGKILL (one blocked in a collective
# cannot run its Python handler; the staging folder is consistent at any instant)
SETTLE_S = 2.0  # after a failure, how long the others get to stop on their own (they name no cause)
EXIT_USAGE, EXIT_CANCELLED = 2, 130
TAIL_LINES = 20  # a worker killed by a signal: this many of its last stderr lines go into the error


def launch_workers(job) -> Generator[ProgressEvent, None, object]:
    """``run_quantize_job(job)`` over ``job.workers`` local processes; returns rank 0's QuantReport."""
    n = job.workers
    if job.config.method == "squeezellm" and job.calibration.samples < n:
        raise UserError(f"--workers {n} needs at least {n} calibration windows, not {job.calibration.samples}: "
                        "raise --samples or use fewer workers")
    logs = Path(tempfile.mkdtemp(prefix="squeeze-workers-"))
    procs: list[subprocess.Popen] = []
    try:
        procs = _start(job, n, logs)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(procs[0].stdout, lines), daemon=True).start()
        report, eof = None, False
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                eof = True
            elif line:
                message = _parse(line)
                if "event" in message:
                    yield ProgressEvent(**message["event"])
                elif "report" in message:
                    report = report_from_dict(message["report"])
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                raise _failure(procs, logs)
            if eof and all(c == 0 for c in codes):
                if report is None:
                    raise RuntimeError("worker 1 ended without a report: see the log above")
                return report
    finally:
        _stop(procs)
        shutil.rmtree(logs, ignore_errors=True)


def _start(job, n: int, logs: Path) -> list[subprocess.Popen]:
    import core

    root = str(Path(core.__file__).resolve().parents[1])
    port = _free_port()
    payload = job_to_json(dataclasses.replace(job, workers=1))
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(threads), JOB_ENV: payload,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with open(logs / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "core.rank_launcher"], env=env,
                                          stdin=subprocess.DEVNULL, stderr=log, start_new_session=True,
                                          stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL))
    return procs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_lines(stream, lines: queue.Queue) -> None:
    try:
        for raw in stream:
            lines.put(raw.decode("utf-8", "replace").strip())
    except (OSError, ValueError):  # closed by _stop
        pass
    lines.put(None)


def _parse(line: str) -> dict:
    """A JSON line of rank 0's, or {} for anything else a library printed."""
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _failure(procs: list[subprocess.Popen], logs: Path) -> Exception:
    """Stop the children still running and say why the run failed."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    stopped = {r for r, p in enumerate(procs) if p.poll() is None}
    _stop(procs)
    n = len(procs)
    codes = {r: p.returncode for r, p in enumerate(procs) if r not in stopped}

    def first(test) -> int | None:
        return next((r for r, c in codes.items() if test(c)), None)

    kept = "finished blocks are kept: run the same command again to resume"
    rank = first(lambda c: c < 0)
    if rank is not None:
        name = signal.Signals(-codes[rank]).name
        why = " (kill -9, or the system's out-of-memory killer)" if name == "SIGKILL" else ""
        return UserError(f"worker {rank + 1} of {n} was killed by {name}{why}; the other workers were stopped, "
                         f"{kept}" + _tail(logs / f"rank{rank}.log"))
    rank = first(lambda c: c == EXIT_USAGE)
    if rank is not None:
        return UserError(_last_line(logs / f"rank{rank}.log").removeprefix("squeeze: error: "))
    rank = first(lambda c: c not in (0, EXIT_RANK_LOST, EXIT_CANCELLED))
    if rank is not None:
        tail = (logs / f"rank{rank}.log").read_text(errors="replace")[-4000:]
        return RuntimeError(f"worker {rank + 1} of {n} failed (exit code {codes[rank]}):\n{tail}")
    return UserError(f"a worker stopped (exit codes {sorted(set(codes.values()))}); the others were stopped, {kept}")


def _tail(path: Path, lines: int = TAIL_LINES, width: int = 300) -> str:
    """The last ``lines`` non-blank lines of a worker's stderr, indented under the error line ("" if none):
    what it said before a signal (an abort's C++ message, a fatal Python error) is all there is to go on."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.rstrip()[:width] for line in text.splitlines() if line.strip()][-lines:]
    if not kept:
        return ""
    return f"\nworker's last {len(kept)} line{'s' if len(kept) > 1 else ''} on stderr:\n" + \
        "\n".join(f"  | {line}" for line in kept)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"{path.stem} failed without a message"


def _stop(procs: list[subprocess.Popen]) -> None:
    """Interrupt the children still running (as Ctrl-C would), SIGKILL those that outlast the grace."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for p in procs:
        if p.stdout is not None:
            p.stdout.close()


# ---------------------------------------------------------------------- the job and the report as JSON


def job_to_json(job) -> str:
    from core.config import to_dict

    data = {}
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        data[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else \
            str(value) if isinstance(value, Path) else value
    return json.dumps(data)


def job_from_json(text: str):
    from core.config import from_dict
    from core.pipeline import QuantizeJob

    data = json.loads(text)
    kwargs = {}
    for f in dataclasses.fields(QuantizeJob):
        if f.name not in data:
            continue
        value = data[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            value = from_dict(type(default), value)
        elif "Path" in str(f.type) and value is not None:
            value = Path(value)
        kwargs[f.name] = value
    return QuantizeJob(**kwargs)


def report_to_dict(report) -> dict:
    return dataclasses.asdict(report)


def report_from_dict(data: dict):
    from core.quantize import LayerReport, QuantReport

    layers = tuple(LayerReport(**{**layer, "shape": tuple(layer["shape"]),
                                  "weighted_errors": tuple(tuple(e) for e in layer["weighted_errors"]),
                                  "refine_objective": tuple(layer["refine_objective"])
                                  if layer.get("refine_objective") is not None else None})
                   for layer in data["layers"])
    return QuantReport(**{**data, "layers": layers})


# ---------------------------------------------------------------------- one child


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # the launcher is gone: stop as if told to
            os.kill(os.getpid(), signal.SIGTERM)
            return


def worker_main() -> int:
    """One rank started by ``launch_workers``: the job from the environment, events to stdout (rank 0)."""
    from core.errors import describe_memory_error
    from core.pipeline import run_quantize_job
    from core.progress import run_to_end

    faulthandler.enable(all_threads=True)  # a fatal signal (SIGABRT, SIGSEGV) leaves the Python stacks in the log
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    job = job_from_json(os.environ.pop(JOB_ENV))
    out = sys.stdout if os.environ.get("RANK") == "0" else None

    def send(message: dict) -> None:
        if out is not None:
            out.write(json.dumps(message) + "\n")
            out.flush()

    try:
        report = run_to_end(run_quantize_job(job), lambda e: send({"event": dataclasses.asdict(e)}))
        if report is not None:
            send({"report": report_to_dict(report)})
        return 0
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    except UserError as exc:
        from core.distributed import RankLost

        if isinstance(exc, RankLost):
            print(f"squeeze: {exc}", file=sys.stderr)
            return EXIT_RANK_LOST
        print(f"squeeze: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"squeeze: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as exc:
        message = describe_memory_error(exc)
        if message is None:
            raise
        print(f"squeeze: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(worker_main())
