"""Test-wide JAX setup: CPU only, 8 fake devices for the mesh tests.

These must be set before JAX initializes its backend, which is why they live here and not in
individual tests.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
