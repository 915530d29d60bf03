"""How torch's idle OpenMP threads wait: asleep, not spinning (BENCHMARKS.md, "CPU contention").

torch's CPU kernels and MKL run on GNU OpenMP (libgomp). By default an idle libgomp thread spins on its
barrier for about 300,000 ``pause`` instructions (milliseconds) before it sleeps, betting that it has a core to
itself. Every small op of a small model is a parallel region, so the worker thread spins between nearly all of
them. On a quiet machine that is a core nobody else wants; on a machine that other processes also load, the
spinning thread takes the time slices the working thread needs, and a thread that reaches a barrier spins while
its partner waits to be scheduled: the mini8 build used about 5x the CPU time of a quiet build with two busy
processes beside it. ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep at once. It changes only how threads
wait, never how work is split among them, so results stay bit-identical.

libgomp reads the variable once, when torch first loads it, so this runs when the package is imported (before
``merging`` imports torch): every ``python -m merging ...`` process gets it, the app's background worker
included, and so do the processes they start. A value the user set wins.
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"


def wait_passively() -> None:
    """Ask libgomp for sleeping idle threads unless the user chose a policy (a no-op once torch is loaded)."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
