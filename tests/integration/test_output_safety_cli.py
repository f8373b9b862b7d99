"""Lose nothing, ever: the real CLI against foreign folders, its own inputs, a second writer,
kills at named points of a swap, and a full disk.

Kills are injected at named points (``MTREC_FAULT=point:kill``, see ``mtrec.files.fault_point``),
so every crash window is hit exactly, never by timing luck.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT, assert_one_line_error, mtrec

SMALL = ["train.epochs=1", "train.batch_size=1024", "model.expert_hidden=[16]", "model.tower_hidden=[8]"]


def _env(fault: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MTREC_FAULT", None)
    if fault:
        env["MTREC_FAULT"] = fault
    return env


def _train_args(clicks: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"--set={s}" for s in [f"data.train={clicks}", *SMALL]]
    return ["train", "--config", "configs/synthetic/mmoe.yaml", *sets, "--output", str(out), "--quiet", *extra]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporaries, locks, staging or old copies that a finished command must not leave."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".incomplete"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.fixture(scope="module")
def clicks(work: Path) -> Path:
    path = work / "clicks.parquet"
    proc = mtrec("datasets", "synthetic", "--rows", "6000", "--seed", "5", "--output", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.fixture(scope="module")
def model(work: Path, clicks: Path) -> Path:
    out = work / "model"
    proc = mtrec(*_train_args(clicks, out))
    assert proc.returncode == 0, proc.stderr
    return out


def _copy_model(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


# ----------------------------------------------------------------------------- 1-4: what --overwrite may replace
def test_train_overwrite_refuses_a_folder_with_stub_model_files(clicks: Path, tmp_path: Path):
    thesis = tmp_path / "thesis"
    (thesis / "data").mkdir(parents=True)
    for name, text in {"config.yaml": "x: 1", "meta.json": "{}", "thesis.tex": "\\begin{document}"}.items():
        (thesis / name).write_text(text)
    (thesis / "data" / "results.csv").write_text("1,2")
    before = _tree(thesis)
    proc = mtrec(*_train_args(clicks, thesis, "--overwrite"))
    assert_one_line_error(proc, str(thesis), "refusing to replace it")
    assert _tree(thesis) == before
    assert _leftovers(tmp_path) == []


def test_train_output_dot_inside_a_project_is_refused(clicks: Path, tmp_path: Path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("# mine")
    (project / "src" / "main.py").write_text("print(1)")
    before = _tree(project)
    env = _env() | {"PYTHONPATH": str(ROOT)}
    config = str(ROOT / "configs/synthetic/mmoe.yaml")
    sets = [f"--set={s}" for s in [f"data.train={clicks}", *SMALL]]
    proc = mtrec("train", "--config", config, *sets, "--output", ".", "--overwrite", cwd=project, env=env)
    assert_one_line_error(proc, "current folder")
    assert _tree(project) == before


def test_evaluate_and_compare_never_replace_a_file_unasked_nor_their_inputs(model: Path, clicks: Path, tmp_path: Path):
    existing = tmp_path / "metrics.json"
    existing.write_text("keep me")
    for cmd in (["evaluate", "--model", str(model)], ["compare", str(model)]):
        proc = mtrec(*cmd, "--data", str(clicks), "--output", str(existing))
        assert_one_line_error(proc, str(existing), "--overwrite")
        assert existing.read_text() == "keep me"
        for target in (clicks, model / "model.safetensors"):
            before = target.read_bytes()
            proc = mtrec(*cmd, "--data", str(clicks), "--output", str(target), "--overwrite")
            assert_one_line_error(proc, str(target))
            assert target.read_bytes() == before
    proc = mtrec("evaluate", "--model", str(model), "--data", str(clicks), "--output", str(existing), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(existing.read_text())["tasks"]["ctr"]["count"] > 0


def test_evaluate_keeps_the_model_directory_provably_mtrecs(model: Path, clicks: Path, tmp_path: Path):
    copy = _copy_model(model, tmp_path / "m")
    for _ in range(2):  # the default output inside the model is mtrec's own, so it may be rewritten
        proc = mtrec("evaluate", "--model", str(copy), "--data", str(clicks))
        assert proc.returncode == 0, proc.stderr
    assert (copy / "evaluations" / "clicks.json").is_file()
    proc = mtrec(*_train_args(clicks, copy, "--overwrite"))
    assert proc.returncode == 0, proc.stderr
    assert not (copy / "evaluations").exists()  # replaced as a whole: the evaluations were registered


def test_score_overwrite_refuses_a_folder_of_the_users_parquet_files(model: Path, clicks: Path, tmp_path: Path):
    user = tmp_path / "warehouse"
    user.mkdir()
    shutil.copy(clicks, user / "part-0.parquet")
    shutil.copy(clicks, user / "part-1.parquet")
    before = _tree(user)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(clicks, inputs / "a.parquet")
    shutil.copy(clicks, inputs / "b.parquet")
    proc = mtrec("score", "--model", str(model), "--input", str(inputs), "--output", str(user), "--overwrite")
    assert_one_line_error(proc, str(user), "refusing to replace it")
    assert _tree(user) == before
    scores = tmp_path / "scores"
    for _ in range(2):  # its own output folder it may replace
        proc = mtrec("score", "--model", str(model), "--input", str(inputs), "--output", str(scores), "--overwrite")
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in scores.iterdir() if not p.name.startswith(".")) == ["a.parquet", "b.parquet"]
    assert _leftovers(tmp_path) == []


def test_export_overwrite_refuses_a_foreign_preprocess_folder(model: Path, tmp_path: Path):
    out = tmp_path / "serve.pt"
    foreign = tmp_path / "serve.pt.preprocess"
    foreign.mkdir()
    (foreign / "notes.md").write_text("mine")
    proc = mtrec("export", "--model", str(model), "--format", "torchscript", "--output", str(out), "--overwrite")
    assert_one_line_error(proc, str(foreign), "refusing to replace it")
    assert (foreign / "notes.md").read_text() == "mine" and not out.exists()


@pytest.mark.parametrize("command", ["train", "score", "evaluate"])
def test_output_root_is_one_line(command: str, model: Path, clicks: Path):
    if command == "train":
        proc = mtrec(*_train_args(clicks, Path("/"), "--overwrite"))
    elif command == "score":
        proc = mtrec("score", "--model", str(model), "--input", str(clicks), "--output", "/", "--overwrite")
    else:
        proc = mtrec("evaluate", "--model", str(model), "--data", str(clicks), "--output", "/", "--overwrite")
    assert_one_line_error(proc, "error: /: ")


# ----------------------------------------------------------------------------- 5: two writers of one output
def _wait_stopped(pid: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the first writer never reached its pause point")


def test_a_second_train_on_the_same_output_is_refused_while_the_first_runs(clicks: Path, tmp_path: Path):
    out = tmp_path / "model"
    first = subprocess.Popen(
        [sys.executable, "-m", "mtrec", *_train_args(clicks, out)],
        cwd=ROOT,
        env=_env("claimed:stop"),  # pauses while it holds the output
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_stopped(first.pid)
        second = mtrec(*_train_args(clicks, out, "--overwrite", "--set=train.seed=9"))
        assert_one_line_error(second, str(out), f"another mtrec process (pid {first.pid})")
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert json.loads((out / "meta.json").read_text())["model"] == "mmoe"
    assert "seed: 9" not in (out / "config.yaml").read_text()
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 6-9: kills at named points
def test_kill_between_the_swap_renames_is_finished_by_the_next_command(model: Path, clicks: Path, tmp_path: Path):
    target = _copy_model(model, tmp_path / "m")
    proc = mtrec(
        *_train_args(clicks, target, "--overwrite", "--set=train.seed=7"), env=_env("swap:between-renames:kill")
    )
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()  # the half-swap: old and new both beside it
    proc = mtrec("evaluate", "--model", str(target), "--data", str(clicks), "--output", str(tmp_path / "e.json"))
    assert proc.returncode == 0, proc.stderr
    assert "seed: 7" in (target / "config.yaml").read_text()  # the finished run won
    assert _leftovers(tmp_path) == []


def test_kill_during_resume_cleanup_keeps_the_finished_run(clicks: Path, tmp_path: Path):
    out = tmp_path / "m"
    proc = mtrec(*_train_args(clicks, out), env=_env("swap:discarding:kill"))
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and (tmp_path / "m.incomplete").is_dir()
    proc = mtrec("train", "--resume", str(out), "--quiet")
    assert_one_line_error(proc, "has finished")
    assert (out / "model.safetensors").is_file() and not (out / "resume").exists()
    proc = mtrec("score", "--model", str(out), "--input", str(clicks), "--output", str(tmp_path / "s.parquet"))
    assert proc.returncode == 0, proc.stderr
    assert _leftovers(tmp_path) == []


def test_kill_inside_export_overwrite_is_detected_and_repaired(model: Path, clicks: Path, tmp_path: Path):
    from mtrec.errors import ModelError
    from mtrec.inference.export import load_exported

    other = tmp_path / "other"  # another model, so that its graph differs from the first export's
    assert mtrec(*_train_args(clicks, other, "--set=train.seed=7")).returncode == 0
    out = tmp_path / "serve.pt"

    def export(source: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        args = ["export", "--model", str(source), "--format", "torchscript", "--output", str(out), "--overwrite"]
        return mtrec(*args, env=_env(fault))

    assert export(model).returncode == 0
    first, _ = load_exported(out)
    proc = export(other, "export:between-renames:kill")
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == first  # the old graph beside the new state: refused, never paired silently
    with pytest.raises(ModelError, match="different exports"):
        load_exported(out)
    assert export(other).returncode == 0
    graph, signature = load_exported(out)
    assert graph != first and signature["model_dir"] == str(other)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("point", ["commit:after-seal", "swap:between-renames", "swap:after-renames"])
def test_a_score_folder_killed_around_its_swap_is_finished_by_the_next_run(
    point: str, model: Path, clicks: Path, tmp_path: Path
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        shutil.copy(clicks, inputs / f"{name}.parquet")
    out = tmp_path / "scores"
    args = ["score", "--model", str(model), "--input", str(inputs), "--output", str(out), "--overwrite"]
    assert mtrec(*args, "--keep", "user_id").returncode == 0
    proc = mtrec(*args, "--keep", "item_id", env=_env(f"{point}:kill"))
    assert proc.returncode == -signal.SIGKILL
    # The next command on the output sees the finished run (it was sealed before the kill).
    proc = mtrec(*args[:-1], "--keep", "item_id")
    assert_one_line_error(proc, "already exists")
    import pyarrow.parquet as pq

    assert pq.read_schema(out / "a.parquet").names[0] == "item_id"
    assert _leftovers(tmp_path) == []


def test_a_killed_score_leaves_temporaries_that_the_next_run_removes(model: Path, clicks: Path, tmp_path: Path):
    out = tmp_path / "s.parquet"
    proc = mtrec(
        "score", "--model", str(model), "--input", str(clicks), "--output", str(out), env=_env("write:s.parquet:kill")
    )
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    proc = mtrec("score", "--model", str(model), "--input", str(clicks), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 10: a full disk
@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_leaves_the_previous_output(
    model: Path, clicks: Path, small_disk: Path, tmp_path: Path
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    many = tmp_path / "many.parquet"  # scores of 120k rows with their IDs do not fit in 1 MiB
    pq.write_table(pa.concat_tables([pq.read_table(clicks)] * 20), many)
    cases = {
        "datasets": ["datasets", "synthetic", "--rows", "50000", "--output", str(small_disk / "big.parquet")],
        "train": _train_args(clicks, small_disk / "model"),
        "score": ["score", "--model", str(model), "--input", str(many), "--output", str(small_disk / "s.parquet")],
        "export": ["export", "--model", str(model), "--format", "torchscript", "--output", str(small_disk / "x.pt")],
    }
    (small_disk / "s.parquet").write_bytes(b"previous scores")
    cases["score"] += ["--overwrite", "--keep", "user_id,item_id,hist_item_ids"]
    for name, args in cases.items():
        proc = mtrec(*args)
        assert_one_line_error(proc, "No space left on device")
        assert sorted(p.name for p in small_disk.iterdir()) == ["s.parquet"], name
    assert (small_disk / "s.parquet").read_bytes() == b"previous scores"
