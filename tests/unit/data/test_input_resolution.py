"""Folders and globs resolve to each real Parquet file once: symlinks followed, loops cut, skips listed.

resolve_paths is the one place that expands ``data.train``/``data.valid``, ``mtrec evaluate
--data`` and ``mtrec score --input``. A loop (``latest -> .``, ``up -> ..``) must neither
repeat rows nor hang; a symlinked subfolder of a folder is read, not silently dropped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mtrec
from mtrec.data.loading import load_training_data
from mtrec.data.parquet import resolve_paths
from mtrec.errors import DataError
from mtrec.schema import Schema, SparseFeature, Task
from tests.integration.helpers import mtrec as cli
from tests.unit.inference.test_score import _table, model_dir  # noqa: F401  (model_dir: the tiny trained model fixture)

# Subprocesses run the mtrec these tests imported, wherever it lives.
CODE_ROOT = Path(mtrec.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(CODE_ROOT)}
# Walking a loop without loop detection never ends: these subprocesses are stopped after this.
HANG_S = 60


def write(path: Path, rows: int, offset: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"u": list(range(offset, offset + rows)), "click": [i % 2 for i in range(rows)]}), path)
    return path


def link(path: Path, target: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path, target_is_directory=True)
    return path


def warning_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mtrec: warning:")]
    assert len(lines) == 1, lines
    return lines[0]


def resolve_in_subprocess(spec: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from mtrec.data.parquet import resolve_paths; print(*resolve_paths(sys.argv[1]), sep='\\n')"
    try:
        return subprocess.run(
            [sys.executable, "-c", code, spec], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=HANG_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"resolving {spec!r} did not finish in {HANG_S} s (a symlink loop walked forever)")


# =========================================================================== loops


def test_loop_link_in_a_glob_counts_the_file_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "data"
    a = write(data / "a.parquet", 5000)
    link(data / "latest", ".")
    assert resolve_paths(str(data / "**" / "*.parquet")) == [a]
    line = warning_line(capsys)
    assert f"{data / 'latest'} (symlink loop back to {data})" in line, line
    # Training reads the 5,000 rows once: train and validation split them, nothing repeated.
    schema = Schema(sparse=(SparseFeature("u"),), tasks=(Task("ctr", label="click"),))
    loaded = load_training_data(schema, str(data / "**" / "*.parquet"), None, valid_fraction=0.2, seed=0)
    assert loaded.train.num_rows + loaded.valid.num_rows == 5000
    assert loaded.train_files == [a]


def test_loop_link_in_a_folder_is_skipped_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "data"
    a, b = write(data / "a.parquet", 3), write(data / "sub" / "b.parquet", 3)
    link(data / "latest", ".")
    link(data / "sub" / "up", "..")
    assert resolve_paths(data) == [a, b]
    line = warning_line(capsys)
    assert "skipped 2 entries" in line, line
    assert f"{data / 'latest'} (symlink loop back to {data})" in line, line
    assert f"{data / 'sub' / 'up'} (symlink loop back to {data})" in line, line


def test_parent_links_terminate_for_globs_and_folders(tmp_path: Path):
    """Two links to the parent double the paths at every level: without loop detection a walk never ends."""
    data = tmp_path / "data"
    a, b = write(data / "s1" / "a.parquet", 3), write(data / "s2" / "b.parquet", 3)
    link(data / "s1" / "up", "..")
    link(data / "s2" / "up", "..")
    for spec in ("data/**/*.parquet", "data"):
        proc = resolve_in_subprocess(spec, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [str(a.relative_to(tmp_path)), str(b.relative_to(tmp_path))]
        assert "data/s1/up (symlink loop back to data)" in proc.stderr, proc.stderr


def test_link_above_the_walked_folder_is_a_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "data"
    a = write(data / "a.parquet", 3)
    write(tmp_path / "elsewhere.parquet", 3)  # beside the folder: not part of it
    link(data / "sub" / "top", "../..")
    assert resolve_paths(data) == [a]
    assert f"{data / 'sub' / 'top'} (symlink loop back to {tmp_path.resolve()})" in warning_line(capsys)


# =========================================================================== links followed, files once


def test_symlinked_subfolder_of_a_folder_is_included(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "data"
    a = write(data / "a.parquet", 3)
    write(tmp_path / "archive" / "2024" / "b.parquet", 4)
    link(data / "old", "../archive")
    assert resolve_paths(data) == [a, data / "old" / "2024" / "b.parquet"]
    assert resolve_paths(str(data / "**" / "*.parquet")) == [a, data / "old" / "2024" / "b.parquet"]
    assert "mtrec: warning" not in capsys.readouterr().err  # nothing skipped


def test_a_file_reached_twice_counts_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "data"
    a = write(data / "day=1" / "a.parquet", 3)
    link(data / "current", "day=1")
    os.symlink("a.parquet", data / "day=1" / "alias.parquet")
    # The name reached without crossing a link wins, whatever the sort order.
    assert resolve_paths(data) == [a]
    line = warning_line(capsys)
    assert f"{data / 'current'} (same folder as {data / 'day=1'})" in line, line
    assert f"{data / 'day=1' / 'alias.parquet'} (same file as {a})" in line, line
    assert resolve_paths(str(data / "*" / "*.parquet")) == [a]
    assert "same folder as" in warning_line(capsys)
    # Across the items of a list, too.
    assert resolve_paths([str(a), str(data / "current" / "a.parquet"), str(a)]) == [a]
    line = warning_line(capsys)
    assert f"{data / 'current' / 'a.parquet'} (same file as {a})" in line and "(listed twice)" in line, line


def test_nothing_left_lists_what_was_skipped_in_the_error(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink("gone.parquet", data / "a.parquet")
    with pytest.raises(
        DataError, match=r"folder contains no \*\.parquet files \(skipped: .*a\.parquet \(broken symlink\)\)"
    ):
        resolve_paths(data)
    with pytest.raises(DataError, match=r"pattern matches no files \(skipped: .*a\.parquet \(broken symlink\)\)"):
        resolve_paths(str(data / "*.parquet"))


# =========================================================================== the real CLI


def test_score_cli_reads_a_symlinked_subfolder_and_skips_a_loop(model_dir: Path, tmp_path: Path):  # noqa: F811
    data = tmp_path / "in"
    for folder in (data / "new", tmp_path / "archive"):
        folder.mkdir(parents=True)
    pq.write_table(_table(300, 1), data / "new" / "part-0.parquet")
    pq.write_table(_table(200, 2), tmp_path / "archive" / "part-1.parquet")
    link(data / "old", "../archive")
    link(data / "latest", ".")
    proc = cli("score", "--model", str(model_dir), "--input", "in", "--output", "out", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "mtrec: warning: in: skipped 1 entry: in/latest (symlink loop back to in)" in proc.stderr, proc.stderr
    out = tmp_path / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == [
        "new/part-0.parquet",
        "old/part-1.parquet",
    ]
    assert pq.read_table(out / "new" / "part-0.parquet").num_rows == 300
    assert pq.read_table(out / "old" / "part-1.parquet").num_rows == 200


def test_train_cli_on_a_glob_with_parent_links_finishes(model_dir: Path, tmp_path: Path):  # noqa: F811
    data = tmp_path / "data"
    for i, sub in enumerate(("s1", "s2")):
        (data / sub).mkdir(parents=True)
        pq.write_table(_table(600, 3 + i), data / sub / f"{sub}.parquet")
    link(data / "s1" / "up", "..")
    link(data / "s2" / "up", "..")
    args = [
        "train",
        "--config",
        str(model_dir / "config.yaml"),
        "--set=data.train=data/**/*.parquet",
        "--output",
        "m",
        "--quiet",
    ]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mtrec", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=ENV,
            timeout=HANG_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"mtrec train did not finish in {HANG_S} s (a symlink loop walked forever)")
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("mtrec: warning:")]
    assert len(warnings) == 1 and "skipped 2 entries" in warnings[0], proc.stderr
