"""What the CLI tests share: running the real ``mtrec`` command and checking its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mtrec(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m mtrec ARGS`` in a subprocess (from the repository root by default)."""
    return subprocess.run(
        [sys.executable, "-m", "mtrec", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=None if env is None else dict(env),
        timeout=600,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2 and exactly one ``mtrec: error: ...`` line holding every needle; returns it."""
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mtrec: error:") and "Traceback" not in proc.stderr, lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
