"""Running a test file again in a process that interprets Triton kernels on CPU.

Triton decides when ``triton.language`` is first imported whether a process
interprets or compiles, so kernel tests that find no GPU and no
``TRITON_INTERPRET=1`` run their file once more in a fresh process that sets it.
"""
import os
import re
import subprocess
import sys
from pathlib import Path


def passed_in_interpreter(test_file: str, cache: Path) -> tuple[int, str]:
    """How many tests of ``test_file`` passed under ``TRITON_INTERPRET=1`` (0 when any failed), and the
    end of the run's output."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(cache)}
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                           env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    passed = re.search(r"(\d+) passed", child.stdout)
    return (int(passed[1]) if passed and child.returncode == 0 else 0), child.stdout[-6000:]
