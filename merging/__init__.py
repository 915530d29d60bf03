"""MergeLens: model merging methods, suites and runs (the library under the app and ``python -m merging``)."""

from merging.threads import wait_passively

wait_passively()  # before anything imports torch: idle OpenMP threads sleep instead of spinning (merging/threads.py)
