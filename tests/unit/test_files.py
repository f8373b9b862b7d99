"""mtrec.files, the one owner of writing: ownership manifests, locks, crash recovery, temporaries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtrec.errors import MtrecError
from mtrec.files import (
    MARKER,
    atomic_write_text,
    check_file_output,
    claim_member,
    claim_output,
    commit_dir,
    new_staging,
    output_path,
    owned_problem,
    read_marker,
    recover,
    remove_owned,
    staged_dir,
)

ROOT = Path(__file__).resolve().parents[2]


def _folder(tmp_path: Path, name: str = "out", kind: str = "scores") -> Path:
    """A complete folder written through the public API, with a file in a subfolder."""
    out = tmp_path / name
    with claim_output(out, kind=kind, overwrite=False) as path, staged_dir(path, kind) as staging:
        (staging / "a.parquet").write_bytes(b"a" * 100)
        (staging / "sub").mkdir()
        (staging / "sub" / "b.parquet").write_bytes(b"b" * 10)
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _temp(path: Path, pid: int, role: str, host: str | None = None) -> Path:
    from mtrec import files

    return path.with_name(f".{path.name}.mtrec-{host or files._HOST}-{pid}-0123abcd.{role}")


def test_a_written_folder_is_provably_mtrecs_and_nothing_else_is(tmp_path):
    out = _folder(tmp_path)
    assert read_marker(out)["complete"] is True
    assert owned_problem(out, ["scores"]) is None
    assert "not model" in owned_problem(out, ["model"])
    (out / "notes.txt").write_text("mine")
    assert "notes.txt, which mtrec did not write" in owned_problem(out, ["scores"])
    (out / "notes.txt").unlink()
    (out / "sub" / "b.parquet").write_bytes(b"c" * 10)  # same size, other content
    assert "changed after mtrec wrote it" in owned_problem(out, ["scores"])
    (out / "sub" / "b.parquet").unlink()  # a removal that was cut short: still ours
    assert owned_problem(out, ["scores"]) is None
    os.symlink(tmp_path, out / "link")
    assert "link, which mtrec did not write" in owned_problem(out, ["scores"])


def test_stub_files_do_not_make_a_folder_mtrecs(tmp_path):
    stub = tmp_path / "thesis"
    stub.mkdir()
    for name in ("config.yaml", "meta.json", "thesis.tex"):
        (stub / name).write_text("x")
    (stub / MARKER).write_text('{"format": "something else"}')
    assert "has no valid" in owned_problem(stub, ["model"])
    with pytest.raises(MtrecError, match="refusing to replace it"):
        with claim_output(stub, kind="model", overwrite=True):
            pass
    assert sorted(p.name for p in stub.iterdir()) == sorted([MARKER, "config.yaml", "meta.json", "thesis.tex"])


def test_replacing_a_folder_leaves_only_the_new_one(tmp_path):
    out = _folder(tmp_path)
    with claim_output(out, kind="scores", overwrite=True) as path, staged_dir(path, "scores") as staging:
        (staging / "new.parquet").write_bytes(b"n")
        assert (out / "a.parquet").exists()  # the old output stays until the new one is sealed
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_build_removes_its_staging_and_keeps_the_old_output(tmp_path):
    out = _folder(tmp_path)
    with pytest.raises(RuntimeError):
        with claim_output(out, kind="scores", overwrite=True) as path, staged_dir(path, "scores") as staging:
            (staging / "half.parquet").write_bytes(b"h")
            raise RuntimeError("boom")
    assert (out / "a.parquet").read_bytes() == b"a" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupted_removal_can_be_finished(tmp_path):
    out = _folder(tmp_path)
    (out / "a.parquet").unlink()  # as if killed inside remove_owned: the marker goes last
    assert owned_problem(out, ["scores"]) is None
    remove_owned(out)
    assert not out.exists()


def test_recover_rolls_back_a_swap_whose_new_folder_was_not_sealed(tmp_path):
    out = _folder(tmp_path)
    pid = _dead_pid()
    old = _temp(out, pid, "old")
    os.replace(out, old)  # killed between the renames, before the new folder was sealed
    stage = _temp(out, pid, "stage")
    stage.mkdir()
    (stage / "partial.parquet").write_bytes(b"p")
    recover(out)
    assert (out / "a.parquet").read_bytes() == b"a" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_finishes_a_swap_whose_new_folder_was_sealed(tmp_path):
    out = _folder(tmp_path)
    new = _folder(tmp_path, "new")
    pid = _dead_pid()
    os.replace(out, _temp(out, pid, "old"))
    os.replace(new, _temp(out, pid, "stage"))  # sealed: the commit point was passed
    recover(out)
    assert (out / "a.parquet").exists() and owned_problem(out, ["scores"]) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_finishes_a_sealed_training_folder_and_drops_its_resume_state(tmp_path):
    out = tmp_path / "m"
    with claim_output(out, kind="model", overwrite=False) as path:
        staging = new_staging(path, "model", name=path.with_name("m.incomplete"))
        (staging / "model.safetensors").write_bytes(b"w")
        (staging / "resume").mkdir()
        (staging / "resume" / "state.json").write_text("{}")
        from mtrec.files import _seal

        _seal(staging, "model", complete=True, discard=["resume"])  # killed right after the seal
    recover(out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    out = tmp_path / "s.parquet"
    dead = _temp(out, _dead_pid(), "tmp")
    live = _temp(out, os.getppid(), "tmp")
    remote = _temp(out, _dead_pid(), "tmp", host="otherhost")
    for p in (dead, live, remote):
        p.write_bytes(b"x")
    with claim_output(out, kind=None, overwrite=False):
        pass
    assert not dead.exists() and live.exists() and remote.exists()


def test_a_second_process_cannot_claim_a_held_output(tmp_path):
    out = tmp_path / "model"
    code = (
        "import sys; from mtrec.files import claim_output\n"
        "try:\n    with claim_output(sys.argv[1], kind='model', overwrite=True): pass\n"
        "except Exception as e:\n    print(e); sys.exit(3)\n"
    )
    with claim_output(out, kind="model", overwrite=False):
        with claim_output(out, kind="model", overwrite=False):  # re-entrant in one process
            pass
        proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 3 and f"another mtrec process (pid {os.getpid()})" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    assert not list(tmp_path.glob(".*mtrec-lock"))  # released locks leave no file behind


def test_file_outputs_need_overwrite_and_are_never_inputs_or_inside_mtrec_folders(tmp_path):
    data = tmp_path / "data.parquet"
    data.write_bytes(b"d")
    with pytest.raises(MtrecError, match="already exists"):
        check_file_output(data, overwrite=False)
    assert check_file_output(data, overwrite=True) == data
    with pytest.raises(MtrecError, match="the input"):
        check_file_output(data, overwrite=True, inputs=[str(data)])
    folder = _folder(tmp_path, "model", kind="model")
    with pytest.raises(MtrecError, match="the input"):
        check_file_output(folder / "a.parquet", overwrite=True, inputs=[folder])
    with pytest.raises(MtrecError, match="a folder written by mtrec"):
        check_file_output(folder / "x.json", overwrite=True)
    with pytest.raises(MtrecError, match="a folder written by mtrec"):
        with claim_output(folder / "sub" / "inner", kind="scores", overwrite=True):
            pass


def test_root_and_current_folder_are_never_outputs(tmp_path, monkeypatch):
    with pytest.raises(MtrecError, match="root folder"):
        output_path("/")
    monkeypatch.chdir(tmp_path)
    for path in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(MtrecError, match="current folder"):
            output_path(path)


def test_a_model_folder_takes_its_own_evaluations_and_refuses_foreign_files(tmp_path):
    folder = _folder(tmp_path, "model", kind="model")
    with claim_member(folder, "evaluations/test.json") as target:
        atomic_write_text(target, "{}")
    assert owned_problem(folder, ["model"]) is None  # registered in the manifest
    with claim_member(folder, "evaluations/test.json") as target:  # a re-evaluation replaces it
        atomic_write_text(target, '{"again": 1}')
    assert owned_problem(folder, ["model"]) is None
    (folder / "evaluations" / "mine.json").write_text("{}")
    with pytest.raises(MtrecError, match="was not written by mtrec"):
        with claim_member(folder, "evaluations/mine.json"):
            pass


def test_commit_is_refused_for_links_inside_a_folder(tmp_path):
    out = tmp_path / "out"
    with claim_output(out, kind="scores", overwrite=False) as path:
        staging = new_staging(path, "scores")
        os.symlink("/etc/passwd", staging / "evil")
        with pytest.raises(MtrecError, match="no links"):
            commit_dir(staging, path, "scores")
        remove_owned(staging)
    assert not out.exists()


def _sealed_stage(tmp_path: Path, out: Path, content: bytes = b"new") -> Path:
    """A finished (sealed) staging folder of ``out`` whose writer died before the swap."""
    from mtrec.files import _seal

    stage = _temp(out, _dead_pid(), "stage")
    stage.mkdir()
    (stage / "a.parquet").write_bytes(content)
    _seal(stage, "scores", complete=True)
    return stage


def test_recovery_never_swaps_over_a_folder_mtrec_did_not_write(tmp_path):
    out = tmp_path / "scores"
    stage = _sealed_stage(tmp_path, out)
    out.mkdir()  # the user made a folder of their own there after the crash
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(MtrecError, match="refusing to replace it"):
        with claim_output(out, kind="scores", overwrite=False):
            pass
    assert (out / "my_notes.txt").read_text() == "mine" and stage.is_dir()  # both kept
    with pytest.raises(MtrecError, match="refusing to replace it"):
        recover(out)  # a reader's recovery is as careful, and says why it cannot finish
    assert (out / "my_notes.txt").read_text() == "mine" and stage.is_dir()


def test_recovery_never_follows_a_link_at_the_output_name(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.csv").write_text("1")
    out = tmp_path / "best"
    _sealed_stage(tmp_path, out)
    os.symlink(user, out)
    with pytest.raises(MtrecError, match="is not a folder"):
        recover(out)
    assert (user / "data.csv").read_text() == "1" and out.is_symlink()
    remove_owned(out)  # a link is unlinked, never walked
    assert (user / "data.csv").read_text() == "1" and not out.exists()


def test_files_added_to_the_old_output_during_a_run_stop_the_swap(tmp_path):
    out = _folder(tmp_path)
    with pytest.raises(MtrecError, match="notebook.ipynb, which mtrec did not write"):
        with claim_output(out, kind="scores", overwrite=True) as path, staged_dir(path, "scores") as staging:
            (staging / "new.parquet").write_bytes(b"n")
            (out / "notebook.ipynb").write_text("saved while the run went on")
    assert (out / "notebook.ipynb").exists()
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".stage")]
    assert len(kept) == 1 and read_marker(kept[0])["complete"]  # the finished result is not thrown away


def test_an_unfinished_training_folder_is_never_an_output(tmp_path):
    with pytest.raises(MtrecError, match="unfinished training runs"):
        with claim_output(tmp_path / "m.incomplete", kind="model", overwrite=True):
            pass
    live = tmp_path / "other"
    with claim_output(live, kind="model", overwrite=False) as path:
        new_staging(path, "model", name=live)  # an unfinished folder under another name
    with pytest.raises(MtrecError, match="unfinished mtrec folder"):
        with claim_output(live, kind="model", overwrite=True):
            pass


def test_a_manifest_cannot_name_a_discard_outside_its_folder(tmp_path):
    out = _folder(tmp_path)
    doc = read_marker(out)
    doc["discard"] = ["../.."]
    (out / MARKER).write_text(__import__("json").dumps(doc))
    assert read_marker(out) is None


def test_an_evaluation_is_registered_even_when_the_command_fails_after_writing_it(tmp_path):
    folder = _folder(tmp_path, "model", kind="model")
    with pytest.raises(RuntimeError):
        with claim_member(folder, "evaluations/test.json") as target:
            atomic_write_text(target, "{}")
            raise RuntimeError("the report failed")
    assert owned_problem(folder, ["model"]) is None
    with claim_member(folder, "evaluations/test.json") as target:
        atomic_write_text(target, "{}")


def test_an_empty_staging_folder_left_by_a_crash_does_not_block(tmp_path):
    out = tmp_path / "m"
    (tmp_path / "m.incomplete").mkdir()  # killed between its mkdir and its marker
    with claim_output(out, kind="model", overwrite=False) as path:
        staging = new_staging(path, "model", name=path.with_name("m.incomplete"))
        assert read_marker(staging)["complete"] is False


def test_a_half_removed_old_output_is_not_restored(tmp_path):
    out = _folder(tmp_path)
    old = _temp(out, _dead_pid(), "old")
    os.replace(out, old)
    (old / "a.parquet").unlink()  # killed inside its removal
    recover(out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_recovery_from_the_current_folder_is_harmless(tmp_path, monkeypatch):
    out = _folder(tmp_path, "model", kind="model")
    monkeypatch.chdir(out)
    recover(".")
    with claim_member(".", "evaluations/x.json") as target:
        atomic_write_text(target, "{}")
    assert owned_problem(out, ["model"]) is None


def test_a_second_thread_cannot_claim_a_held_output(tmp_path):
    import threading

    out = tmp_path / "m"
    errors = []

    def other() -> None:
        try:
            with claim_output(out, kind="model", overwrite=True):
                pass
        except MtrecError as exc:
            errors.append(str(exc))

    with claim_output(out, kind="model", overwrite=False):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another mtrec process" in errors[0]
