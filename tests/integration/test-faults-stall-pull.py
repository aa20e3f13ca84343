#!/usr/bin/env python3
"""test-faults-stall.py with pull mode backups (qbak reads the point from QEMU's fleecing export)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from qbaktest import run_in_mode  # noqa: E402

run_in_mode("test-faults-stall.py", "pull")
