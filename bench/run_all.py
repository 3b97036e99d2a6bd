"""`make bench`: every benchmark under bench/, one after another (results in bench/results/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["memory_footprint.py", "engine_throughput.py", "inplace_decode.py", "openmp_wait.py", "memory_clients.py",
           "server_throughput.py", "shared_prefix.py", "prompt_speed.py"]

if __name__ == "__main__":
    rc = 0
    for script in SCRIPTS:
        if (HERE / script).exists():
            print(f"== {script}", flush=True)
            rc |= subprocess.call([sys.executable, str(HERE / script)])
    sys.exit(rc)
