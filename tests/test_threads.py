"""Idle OpenMP threads sleep in ``python -m merging`` processes (merging/threads.py; BENCHMARKS.md, "CPU contention").

libgomp prints the settings it actually uses with ``OMP_DISPLAY_ENV=VERBOSE``; ``GOMP_SPINCOUNT`` is how long an
idle thread spins before it sleeps: 0 with the passive policy, 300000 by default.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def libgomp_settings(args: list[str], **env: str) -> dict[str, str]:
    # this test process imported merging, which put OMP_WAIT_POLICY in os.environ: start from an environment without it
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
                         capture_output=True, text=True, timeout=120, check=True)
    return dict(re.findall(r"^\s+(\w+) = '([^']*)'", out.stderr, re.M))


def test_python_m_merging_lets_idle_openmp_threads_sleep():
    settings = libgomp_settings(["-m", "merging", "suite", "list"])  # imports torch, as the suite build and the job worker do
    assert settings["OMP_WAIT_POLICY"] == "PASSIVE"
    assert settings["GOMP_SPINCOUNT"] == "0"


def test_without_merging_torch_spins_and_a_users_policy_wins():
    """The check above is not vacuous: torch alone spins; and an explicit OMP_WAIT_POLICY is left as it is."""
    assert libgomp_settings(["-c", "import torch; torch.ones(1)"])["GOMP_SPINCOUNT"] == "300000"
    assert libgomp_settings(["-m", "merging", "suite", "list"], OMP_WAIT_POLICY="active")["OMP_WAIT_POLICY"] == "ACTIVE"
