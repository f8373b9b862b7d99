"""The ``mtrec`` process ends with ``os._exit`` (``mtrec.cli.run``): what an ordinary exit
would still have done must be done before it."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.helpers import ROOT

# A process that runs the CLI as the console script does, with an exit handler and a
# non-daemon thread of its own that is still running when the command has returned.
PROBE = """
import atexit, sys, threading, time
from mtrec import cli
returned = threading.Event()
command = cli.main
def main():
    code = command()
    returned.set()
    return code
cli.main = main
atexit.register(lambda: print("exit handler ran"))
threading.Thread(target=lambda: (returned.wait(), time.sleep(0.3), print("thread finished"))).start()
sys.argv = ["mtrec", *sys.argv[1:]]
cli.run()
"""


def _probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env
    )


def test_run_flushes_output_waits_for_threads_and_runs_exit_handlers() -> None:
    proc = _probe("models")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # the command's whole output (block-buffered into a pipe) arrives, then the thread's, then the handler's
    assert any(line.split()[:1] == ["mmoe"] for line in lines), proc.stdout
    assert lines[-2:] == ["thread finished", "exit handler ran"], proc.stdout


def test_run_keeps_the_exit_code_of_bad_input(tmp_path) -> None:
    proc = _probe("evaluate", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "x.parquet"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("mtrec: error:"), proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["thread finished", "exit handler ran"]
