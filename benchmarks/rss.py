"""Resident memory of a process and all its descendants, sampled from /proc (Linux).

`RssAnon` is anonymous memory (heaps, Arrow's memory pool, tensors); `RssFile` is file pages mapped into the process
(shared libraries, memory-mapped Arrow files): both count towards the RSS that schedulers and container limits
police. `TreeSampler` reads `/proc/<pid>/status` of the root process and of every process below it every
`interval` seconds in a thread and keeps, per process, the peak of each and the peak of their sum; `mark(name)`
starts a named phase (e.g. "training"), whose peaks are kept apart.

    with TreeSampler(proc.pid) as rss:
        ...
        rss.mark("training")
        ...
    rss.summary()  # {"root": {...}, "children": {...}, "phases": {...}}
"""

import os
import threading
import time
from pathlib import Path

MB = 2**20


def rss_kb(pid: int) -> dict:
    """{"anon": kB, "file": kB} of one process (`RssAnon`, `RssFile` of /proc/<pid>/status); {} if it is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                out["anon"] = int(line.split()[1])
            elif line.startswith("RssFile:"):
                out["file"] = int(line.split()[1])
    except (OSError, ValueError):
        return {}
    return out


def descendants(pid: int) -> list:
    """Every live process below `pid` (children, their children, ...), from the parent ids in /proc/*/stat."""
    parent = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        parent[int(entry.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        out += frontier
    return out


class TreeSampler:
    """Peaks of RssAnon, RssFile (and of their sum) of `pid` ("root") and each of its descendants ("children": the
    largest of any one child, and of all children at once), over the whole run and per phase (`mark`)."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.phase = "start"
        self.peaks = {}  # (phase, "root" | "child" | "children") -> {"anon", "file", "total"} in kB
        self.children_seen = set()
        self.samples = 0
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mark(self, phase: str):
        self.sample()
        self.phase = phase

    def _keep(self, key, values):
        peak = self.peaks.setdefault(key, {"anon": 0, "file": 0, "total": 0})
        for k, v in values.items():
            peak[k] = max(peak[k], v)

    def sample(self):
        with self._lock:
            self._sample()

    def _sample(self):
        root = rss_kb(self.pid)
        if not root:
            return
        below = descendants(self.pid)
        kids = [k for k in map(rss_kb, below) if k]
        self.children_seen.update(below)
        summed = {"anon": sum(k["anon"] for k in kids), "file": sum(k["file"] for k in kids)}
        for phase in ("all", self.phase):
            self._keep((phase, "root"), {**root, "total": root["anon"] + root["file"]})
            for k in kids:
                self._keep((phase, "child"), {**k, "total": k["anon"] + k["file"]})
            if kids:
                self._keep((phase, "children"), {**summed, "total": summed["anon"] + summed["file"]})
        self.samples += 1

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        """{phase: {"root" | "child" | "children": {"anon_mb", "file_mb", "total_mb"}}} with phase "all" for the
        whole run, plus "children_seen" (how many processes ran below the root) and "samples"."""
        out = {"children_seen": len(self.children_seen), "samples": self.samples}
        for (phase, who), peak in self.peaks.items():
            out.setdefault(phase, {})[who] = {f"{k}_mb": v * 1024 / MB for k, v in peak.items()}
        return out


def run_sampled(cmd: list, env: dict = None, phases: dict = None, interval: float = 0.2, timeout: float = 3600,
                cwd=None) -> dict:
    """Runs `cmd`, sampling its process tree; `phases` maps a phase name to a text that, when the command prints a
    line holding it (stdout or stderr), starts that phase. Returns the summary with "returncode", "seconds" and the
    output's last lines."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    tail = []
    with TreeSampler(proc.pid, interval) as sampler:
        deadline = start + timeout
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            for name, text in (phases or {}).items():
                if text in line and sampler.phase != name:
                    sampler.mark(name)
            if time.perf_counter() > deadline:
                proc.kill()
                break
        proc.wait()
    return {**sampler.summary(), "returncode": proc.returncode, "seconds": time.perf_counter() - start, "tail": tail}
