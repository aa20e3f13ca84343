#!/usr/bin/env python3
"""test-crash.py with push mode backups (QEMU's backup job sends the data)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import run_in_mode  # noqa: E402

run_in_mode("test-crash.py", "push")
