"""Test-wide JAX setup: CPU only, 8 fake devices for the mesh tests, and fast compilation.

These must be set before JAX initializes its backend, which is why they live here and not in
individual tests. Subprocesses (launchers, notebooks, multi-process runs) inherit them.

Most of the suite's time is XLA compiling small programs, not running them:

* LLVM's optimization level 0 halves CPU compile times. It changes no result: XLA's CPU backend
  does not allow floating-point reassociation, so the same HLO computes the same numbers.
* One persistent compilation cache for the whole run, shared by the test workers and every
  subprocess they start, so a program compiled once (the launcher's train step, say) is loaded
  by the next process that needs it.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  ).strip()
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxrec-tests-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
