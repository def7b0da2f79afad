"""What every benchmark here shares: the machine's load beside each figure, rates read from one run's own events,
and child processes whose peak memory is their own.

Why: a benchmark once reported our loop at a third of the baseline's speed because two repeats appended to the same
events file (the "rate" spanned both runs and the baseline between them), and figures taken while other jobs held
the cores are tenfold off on a 2-core machine. So each run writes into a fresh folder, its rate comes from that
folder's events only (`rate_from_events` refuses a file holding more than one run), and every JSON line carries the
load average at start and end with the core count (`LoadWatch`), with a warning on stderr when the load exceeds the
cores.

The load average alone cannot tell a quiet machine from a busy one at the *end* of a run: the benchmark's own two
torch threads lift the 1-minute figure to about the core count, so a clean run on 2 cores ended "loaded" at 2.4.
So `LoadWatch` also measures the CPU time spent by everything *outside* this benchmark and its children while it ran
(`/proc/stat` busy time minus our own `os.times()`), as cores kept busy by others (`other_cores`); `loaded` is true
when others kept more than `OTHER_CORES_MAX` busy on average. The start load average is reported and warned about,
but it does not decide: it still counts a job that ended a moment ago (the previous benchmark of a chain).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence


def cores() -> int:
    """Cores this process may run on (the affinity mask, where the platform has one), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages; None where the platform has none (Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


OTHER_CORES_MAX = 0.25  # cores' worth of CPU others may use beside a benchmark before its figures are suspect


def busy_cpu_seconds() -> Optional[float]:
    """CPU seconds every process on the machine has spent busy since boot (``/proc/stat``); None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in (fields + ["0"] * 8)[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (every benchmark child is waited for)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadWatch:
    """Load at start and end of a benchmark, and the CPU others used meanwhile, as JSON fields, with a warning when
    the figures are not a result."""

    def __init__(self) -> None:
        self.cores = cores()
        self.start = load_average()
        self._t0, self._busy0, self._own0 = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds()
        if self.start is not None and self.start[0] > self.cores:
            print(f"warning: load average {self.start[0]} at start exceeds the {self.cores} cores (it also counts "
                  f"work that just ended); 'other_cores' in the result says what ran beside this benchmark",
                  file=sys.stderr)

    @staticmethod
    def _warn(why: str) -> None:
        print(f"warning: {why}: other work is running, so these figures are not a result (rerun on a quiet "
              f"machine)", file=sys.stderr)

    def other_cores(self) -> Optional[float]:
        """Average cores kept busy by processes outside this benchmark since it started."""
        busy = busy_cpu_seconds()
        if busy is None or self._busy0 is None:
            return None
        wall = max(time.monotonic() - self._t0, 1e-6)
        others = (busy - self._busy0) - (own_cpu_seconds() - self._own0)
        return round(max(others, 0.0) / wall, 3)

    def fields(self) -> dict:
        end, others = load_average(), self.other_cores()
        if others is None:  # no /proc/stat: fall back on the load averages
            loaded = any(load is not None and load[0] > self.cores for load in (self.start, end))
        else:
            loaded = others > OTHER_CORES_MAX
        if loaded:
            self._warn(f"other processes kept {others} cores busy on average beside this benchmark" if others is not None
                       else f"the load average exceeded the {self.cores} cores")
        return {"load_start": self.start, "load_end": end, "cores": self.cores, "other_cores": others,
                "loaded": loaded}


def emit(result: dict, watch: LoadWatch) -> dict:
    """Print the benchmark's one JSON line (the last line of its output), with the load fields added."""
    line = {**result, **watch.fields(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(line), flush=True)
    return line


class EventsError(ValueError):
    """An events file that cannot give one run's rate (empty, or holding more than one run)."""


def step_times(path: Path) -> list[tuple[int, float]]:
    """(step, time) of every step event in one run's events file, checked to be that one run: a single ``start``
    (when the writer emits one) and steps counting 1, 2, 3 … exactly once each."""
    start_count, steps = 0, []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("type") == "start":
                start_count += 1
            elif event.get("type") == "step":
                steps.append((int(event["step"]), float(event["time"])))
    if start_count > 1:
        raise EventsError(f"{path}: {start_count} runs in one events file; every run needs its own folder")
    numbers = [s for s, _ in steps]
    if numbers != list(range(1, len(numbers) + 1)):
        raise EventsError(f"{path}: steps {numbers[:8]}… are not one run's 1, 2, 3 …")
    return steps


def rate_from_events(path: Path, warmup: int) -> dict:
    """Steps/s over the steps after ``warmup``, from this file alone; also the first timed step's time, so a reader
    can see which run the rate came from."""
    steps = step_times(path)
    timed = steps[warmup:]
    if len(timed) < 2:
        raise EventsError(f"{path}: {len(steps)} steps; need at least warmup ({warmup}) + 2 to time")
    span = timed[-1][1] - timed[0][1]
    if span <= 0:
        raise EventsError(f"{path}: steps {timed[0][0]}..{timed[-1][0]} took no measurable time")
    return {"steps_s": (len(timed) - 1) / span, "timed_steps": len(timed), "first_timed_time": timed[0][1],
            "last_time": timed[-1][1], "events": str(path)}


def fresh_dir(path: Path) -> Path:
    """A run folder that must not exist yet: appending to an old run's files is what broke the rates before."""
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: a run folder must be fresh, but it holds files from an earlier run")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_child(cmd: Sequence[str], out_dir: Path, timeout: Optional[float] = None,
              env: Optional[dict] = None) -> dict:
    """Run one benchmark process with its stdout and stderr in ``out_dir``; returns its exit code, wall time, peak
    RSS and last stdout line. Peak RSS comes from ``wait4`` on that process (and the children it waited for), so runs
    measured one after the other never share a figure; 0 where the platform has no ``wait4`` (Windows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = out_dir / "stdout.txt", out_dir / "stderr.txt"
    killed = threading.Event()
    t0 = time.perf_counter()
    with open(stdout_path, "w", encoding="utf-8") as out, open(stderr_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err,
                                env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                peak_mb = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)  # macOS: bytes, Linux: KiB
            else:
                proc.wait()
                peak_mb = 0.0
        finally:
            if timer:
                timer.cancel()
    wall = time.perf_counter() - t0
    lines = [ln for ln in stdout_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return {"returncode": 124 if killed.is_set() else proc.returncode, "wall_s": wall, "peak_rss_mb": peak_mb,
            "last_line": lines[-1] if lines else "", "stderr_tail": _tail(stderr_path),
            "timed_out": killed.is_set()}


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-chars:]


def child_json(run: dict, what: str) -> dict:
    """The JSON object a child printed last, or an error naming the child and showing the end of its stderr."""
    if run["timed_out"]:
        raise RuntimeError(f"{what}: killed after its time limit; see {what} stderr:\n{run['stderr_tail']}")
    if run["returncode"] != 0:
        raise RuntimeError(f"{what}: exit code {run['returncode']}:\n{run['stderr_tail']}")
    try:
        return json.loads(run["last_line"])
    except json.JSONDecodeError:
        raise RuntimeError(f"{what}: its last line is not JSON: {run['last_line'][:200]!r}") from None
