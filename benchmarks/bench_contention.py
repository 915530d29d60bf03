"""The mini8 suite build's wall and CPU time while busy processes load the machine (BENCHMARKS.md, "CPU contention").

    export NUMBA_CACHE_DIR=$PWD/cache/numba
    .venv/bin/python benchmarks/bench_contention.py --busy 2              # with two competing busy processes
    .venv/bin/python benchmarks/bench_contention.py --busy 0              # the quiet reference
    .venv/bin/python benchmarks/bench_contention.py --busy 2 --repo /tmp/before --timeout 900 --keep /tmp/suite-before
    .venv/bin/python benchmarks/bench_contention.py --compare /tmp/suite-before /tmp/suite-after

Starts ``--busy`` processes that spin (``while True: pass``), then ``python -m merging suite build mini8`` into a fresh
temporary ``--cache-dir`` (removed afterwards), run from ``--repo`` (default: this checkout) so that a worktree of an
older commit can be measured with the same interpreter. Reports the build's wall time, its CPU time (user+system from
``os.wait4``; read from ``/proc`` when ``--timeout`` stops it), each of its threads' CPU time (sampled from
``/proc/<pid>/task/*/stat`` every ``--sample`` seconds), the load average before the start, and the fingerprint the
build prints. Its stderr is a pseudo-terminal, so tqdm draws and the last progress line says how far a stopped build got.
``--keep DIR`` copies the built suite folder to DIR; ``--compare A B`` checks two kept folders byte for byte and
tensor for tensor (``torch.equal``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def proc_cpu(path: Path) -> tuple[str, float]:
    """(comm, user+system seconds) of a /proc/<pid> or /proc/<pid>/task/<tid> entry."""
    text = (path / "stat").read_text()
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return comm, (int(fields[11]) + int(fields[12])) / TICK


def machine_busy() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat; idle and iowait left out)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def sample_threads(pid: int, seen: dict[int, tuple[str, float]]) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seen[int(task.name)] = proc_cpu(task)
        except (OSError, ValueError):
            pass


def read_progress(fd: int, state: dict) -> None:
    """Keep the last non-empty line tqdm drew on the pseudo-terminal."""
    buf = ""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        buf = ANSI.sub("", buf + chunk.decode(errors="replace"))
        parts = re.split(r"[\r\n]", buf)
        buf = parts[-1]
        lines = [p.strip() for p in parts[:-1] if p.strip()]
        if lines:
            state["last"] = re.sub(r"\|[^|]*\|", "|", lines[-1])  # without the bar itself


def measure(args: argparse.Namespace) -> dict:
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.env)}
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / "cache" / "numba"))
    load_before = os.getloadavg()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    cache = Path(tempfile.mkdtemp(prefix="contention-cache-"))
    log = cache.parent / f"{cache.name}.out"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # tqdm draws nothing 0 columns wide
    progress: dict = {"last": ""}
    reader = threading.Thread(target=read_progress, args=(master, progress), daemon=True)
    proc = None
    try:
        time.sleep(1.0 if busy else 0.0)  # let the busy processes get going
        cmd = [args.python, "-m", "merging", "suite", "build", args.suite, "--cache-dir", str(cache)]
        t0, machine0 = time.perf_counter(), machine_busy()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=args.repo, env=env, stdout=out, stderr=slave)
        os.close(slave)
        reader.start()
        threads: dict[int, tuple[str, float]] = {}
        capped, cpu, user, next_sample, trace = False, None, None, 0.0, []
        while True:
            wpid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if wpid:
                wall = time.perf_counter() - t0
                cpu, user = usage.ru_utime + usage.ru_stime, usage.ru_utime
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() >= next_sample:
                try:
                    sample_threads(proc.pid, threads)
                    trace.append((round(time.perf_counter() - t0, 1), round(proc_cpu(Path(f"/proc/{proc.pid}"))[1], 1), progress["last"]))
                except OSError:
                    pass
                next_sample = time.perf_counter() + (min(args.sample, 1.0) if time.perf_counter() - t0 < 5 else args.sample)
            if args.timeout and time.perf_counter() - t0 > args.timeout:
                sample_threads(proc.pid, threads)
                wall, cpu, capped = time.perf_counter() - t0, proc_cpu(Path(f"/proc/{proc.pid}"))[1], True
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.05)
        busy_cpu = [proc_cpu(Path(f"/proc/{b.pid}"))[1] for b in busy]
        machine = machine_busy() - machine0
        reader.join(timeout=2)
        stdout = log.read_text()
        fingerprint = re.search(r"fingerprint (\w+)", stdout)
        if args.keep and not capped:
            built = next((cache / "suites").glob(f"{args.suite}-*"))
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(built, args.keep)
        return {
            "repo": str(Path(args.repo).resolve()),
            "busy": args.busy,
            "env": dict(kv.split("=", 1) for kv in args.env),
            "load_before": [round(x, 2) for x in load_before],
            "returncode": proc.returncode,
            "capped": capped,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "user_s": None if user is None else round(user, 1),
            "threads_cpu_s": {f"{tid}{' (main)' if tid == proc.pid else ''} {comm}": round(s, 1)
                              for tid, (comm, s) in sorted(threads.items(), key=lambda kv: -kv[1][1]) if s >= 0.5},
            "busy_cpu_s": [round(s, 1) for s in busy_cpu],
            "other_cpu_s": round(machine - cpu - sum(busy_cpu), 1),  # everything else on the machine meanwhile
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "fingerprint": fingerprint.group(1) if fingerprint else None,
            "last_progress": progress["last"],
            "stdout": stdout.strip().splitlines()[-2:],
            "trace": trace,  # (wall s, CPU s, progress line) every --sample seconds
        }
    finally:
        if proc is not None and proc.returncode is None:  # stopped from outside (Ctrl-C, SIGTERM): stop the build too
            proc.kill()
            proc.wait()
        for b in busy:
            b.kill()
            b.wait()
        os.close(master)
        shutil.rmtree(cache, ignore_errors=True)
        log.unlink(missing_ok=True)


def compare(a: Path, b: Path) -> bool:
    """Whether two kept suite folders hold the same tensors (and the same bytes)."""
    import torch
    from safetensors.torch import load_file

    same = True
    for f in sorted(p.name for p in a.glob("*.safetensors")):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        equal = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        byte_equal = (a / f).read_bytes() == (b / f).read_bytes()
        print(f"{f}: {len(ta)} tensors, torch.equal on all: {equal}; files byte-identical: {byte_equal}")
        same &= equal and byte_equal
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="competing busy processes (default 2)")
    parser.add_argument("--suite", default="mini8")
    parser.add_argument("--repo", default=str(ROOT), help="checkout to run the build from (default: this one)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--timeout", type=float, default=0.0, help="stop the build after this many seconds (0: never)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between per-thread CPU samples")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for the build")
    parser.add_argument("--keep", type=Path, help="copy the built suite folder here")
    parser.add_argument("--json", type=Path, help="append the result as one JSON line to this file")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="only compare two kept suite folders")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the build and the busy processes are stopped too
    if args.compare:
        sys.exit(0 if compare(*args.compare) else 1)
    result = measure(args)
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
