"""The one owner of writing: output checks, locks, atomic files and folders, crash recovery.

Every output mtrec writes (model directories, prepared datasets, scores, exports,
reports, metrics JSON) goes through here, so that

* nothing is replaced without ``--overwrite``, and a folder only when it is provably
  something mtrec wrote: a folder output carries ``.mtrec-output.json``, a manifest
  with a format id, the kind of output and every file's size and SHA-256. Before a
  folder is replaced or removed the manifest is checked against what is on disk; a file
  mtrec did not put there, or one changed since, means refuse;
* an output is never one of the command's own inputs, nor a file inside another
  mtrec folder (a model directory's weights, say);
* two writers of one output are refused with one line: each holds an exclusive
  ``flock`` on ``.NAME.mtrec-lock`` beside the output for as long as it writes (a kill
  releases it; the file is removed when the writer is done);
* a reader never sees half a file or folder: files are written under a temporary name
  and renamed; folders are built in a staging folder, sealed with their manifest (the
  commit point) and swapped in; and a crash at any point leaves either the old output
  or the new one: the next command on that output finishes or rolls back a half-done
  swap (:func:`recover`) and removes the temporaries of dead writers, whose names
  carry the writer's host and pid.

Temporaries are hidden names beside the output: ``.NAME.mtrec-HOST-PID-RAND.ROLE``
with ROLE ``tmp`` (a file being written), ``stage`` (a folder being built) or ``old``
(the previous output during a swap). Training builds its folder under the visible
``NAME.incomplete`` instead, because an interrupted run is resumed from there.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from mtrec.errors import MtrecError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "MARKER",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_file_output",
    "claim_member",
    "claim_output",
    "commit_dir",
    "fault_point",
    "is_sealed",
    "new_staging",
    "output_path",
    "owned_problem",
    "read_marker",
    "recover",
    "register_file",
    "remove_owned",
    "staged_dir",
    "staging_dir",
    "write_file",
]

MARKER = ".mtrec-output.json"
FORMAT = "mtrec-output/1"
MAX_MARKER_BYTES = 64 << 20


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Temporary files and folders are created private (0600 / 0700); what is renamed into
# place gets the modes an ordinary file or folder would have under the user's umask.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


# ----------------------------------------------------------------------------- fault points
def fault_point(name: str) -> None:
    """A named point where tests kill the process or fill the disk (``MTREC_FAULT=name:kill``).

    ``MTREC_FAULT`` holds ``point:action`` pairs separated by commas; ``kill`` sends
    SIGKILL to this process (a crash at exactly that point, not by timing luck),
    ``stop`` SIGSTOP (a writer paused while it holds its output) and ``enospc`` raises
    the error a full disk gives. Unset, this is one dict lookup.
    """
    spec = os.environ.get("MTREC_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        point, _, action = item.rpartition(":")
        if point == name:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)  # the test looks around, then sends SIGCONT
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------- paths
def _absolute(path: str | Path) -> Path:
    """``path`` made absolute through its parent's real path (the name itself is kept)."""
    p = Path(os.path.abspath(os.fspath(path)))
    if p.parent == p or p.name in ("", ".", ".."):
        raise MtrecError(f"{path}: cannot write the root folder; choose a file or folder below it")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise MtrecError(f"{parent}: is a file, so {p} cannot be written")
    return Path(os.path.realpath(p.parent)) / p.name


def output_path(path: str | Path) -> Path:
    """``path`` absolute (see :func:`_absolute`), refusing what can never be an output: the file
    system root and the current folder or one above it."""
    real = _absolute(path)
    cwd = Path.cwd().resolve()
    if real.resolve() == cwd or real.resolve() in cwd.parents:
        raise MtrecError(f"{path}: is the current folder or one above it; choose a folder of its own")
    return real


def staging_dir(output: str | Path) -> Path:
    """Where training builds a model directory before it is complete (``DIR.incomplete``)."""
    output = _absolute(output)
    return output.with_name(output.name + ".incomplete")


def _temp_name(path: Path, role: str) -> Path:
    return path.with_name(f".{path.name}.mtrec-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{role}")


_TEMP = re.compile(r"^\.(?P<name>.+)\.mtrec-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<role>tmp|stage|old)$")


def _temps(path: Path) -> list[tuple[Path, str, int, str]]:
    """mtrec's temporaries of ``path``: (temp path, host, pid, role)."""
    if not path.parent.is_dir():
        return []
    out = []
    prefix = f".{path.name}.mtrec-"
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        m = _TEMP.match(entry.name)
        if m and m["name"] == path.name:
            out.append((entry, m["host"], int(m["pid"]), m["role"]))
    return out


def _alive(host: str, pid: int) -> bool:
    """Whether the writer named in a temporary may still be running (this process counts)."""
    if host != _HOST:
        return True  # another machine's writer (a shared file system): never ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_temp(name: str) -> bool:
    m = _TEMP.match(name)
    return m is not None and not _alive(m["host"], int(m["pid"]))


# ----------------------------------------------------------------------------- locks
_held: dict[tuple[Path, int], int] = {}


@contextmanager
def _lock(path: Path, *, refuse: bool = True) -> Iterator[bool]:
    """Exclusive lock of output ``path`` for this thread (re-entrant); yields whether it is held.

    The lock is an ``flock`` on ``.NAME.mtrec-lock`` beside the output, removed on
    release; a lock taken on a file that another process has just removed is dropped and
    taken again, so two writers never hold different files. When another process (or
    thread) holds it: one line naming the process, or (``refuse=False``) False, for
    callers that only tidy up what is not in use.
    """
    key = (path, threading.get_ident())
    if key in _held:
        yield True
        return
    lock = path.with_name(f".{path.name}.mtrec-lock")
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as exc:
            raise MtrecError(f"{path}: cannot create the lock file {lock} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if not refuse:
                yield False
                return
            raise MtrecError(
                f"{path}: another mtrec process (pid {pid}) is writing it; wait for it or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it as we opened it: lock the new one
    else:  # pragma: no cover - 100 races in a row
        raise MtrecError(f"{path}: cannot take the lock {lock}")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held[key] = fd
        try:
            yield True
        finally:
            del _held[key]
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


# ----------------------------------------------------------------------------- manifests
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _walk(folder: Path, skip: Iterable[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """Files, folders and other entries (links, devices) below ``folder``, relative.

    The marker and the top-level entries named in ``skip`` are left out.
    """
    skip = set(skip)
    files: list[str] = []
    dirs: list[str] = []
    other: list[str] = []
    for root, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(root)
        if base == folder:
            dirnames[:] = [d for d in dirnames if d not in skip or (base / d).is_symlink()]
        for d in dirnames:
            rel = (base / d).relative_to(folder).as_posix()
            (other if (base / d).is_symlink() else dirs).append(rel)
        for f in filenames:
            p = base / f
            rel = p.relative_to(folder).as_posix()
            if rel == MARKER or (base == folder and f in skip):
                continue
            (files if p.is_file() and not p.is_symlink() else other).append(rel)
    return files, dirs, other


def _write_marker(folder: Path, doc: dict[str, Any]) -> None:
    atomic_write_text(folder / MARKER, json.dumps(doc, indent=1))


def _seal(folder: Path, kind: str, *, complete: bool, discard: Sequence[str] = ()) -> None:
    """Writes the manifest of ``folder``: every file's size and hash (``discard`` entries are
    not part of the output and are left out; dead writers' temporaries are removed)."""
    files, _, other = _walk(folder, skip=discard)
    if other:
        raise MtrecError(f"{folder / other[0]}: mtrec writes no links or special files here")
    for rel in [r for r in files if _dead_temp(Path(r).name)]:
        (folder / rel).unlink()
        files.remove(rel)
    entries = {rel: [(folder / rel).stat().st_size, _sha256(folder / rel)] for rel in sorted(files)}
    _write_marker(
        folder, {"format": FORMAT, "kind": kind, "complete": complete, "discard": list(discard), "files": entries}
    )


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The manifest of a folder mtrec wrote, or None where there is none (or it is not one)."""
    marker = folder / MARKER
    try:
        if folder.is_symlink() or not marker.is_file() or marker.is_symlink():
            return None
        if marker.stat().st_size > MAX_MARKER_BYTES:
            return None
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        return None
    if not isinstance(doc.get("kind"), str) or not isinstance(doc.get("complete"), bool):
        return None
    discard = doc.get("discard", [])
    if not isinstance(discard, list) or not all(_plain_name(d) for d in discard):
        return None
    return doc


def _plain_name(name: Any) -> bool:
    """One path component that stays inside its folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


# What an unfinished folder (training's NAME.incomplete) may hold besides its marker, by kind:
# each kind's owner registers its names (the model directory's are mtrec.model_dir's).
_STAGING_NAMES: dict[str, frozenset[str]] = {}


def allow_staging_names(kind: str, names: Iterable[str]) -> None:
    """Declares the top-level names an unfinished folder of ``kind`` may hold."""
    _STAGING_NAMES[kind] = frozenset(names)


def owned_problem(folder: Path, kinds: Iterable[str], *, whole: bool = False) -> str | None:
    """Why ``folder`` is not provably an mtrec output of one of ``kinds`` (None: it is).

    A complete folder must hold nothing but files of its manifest, each with its
    recorded size and hash, and dead writers' temporaries; files may be missing (a
    removal that was interrupted) unless ``whole``. An unfinished one may hold only the
    names its kind writes, and temporaries.
    """
    kinds = tuple(kinds)
    if folder.is_symlink():
        return "is a symbolic link"
    doc = read_marker(folder)
    if doc is None:
        return f"has no valid {MARKER} (it was not written by this version of mtrec)"
    if doc["kind"] not in kinds:
        return f"is an mtrec {doc['kind']} folder, not {' or '.join(kinds)}"
    discard = [d for d in doc.get("discard", []) if (folder / d).is_dir() and not (folder / d).is_symlink()]
    files, _, other = _walk(folder, skip=discard)
    if other:
        return f"holds {other[0]}, which mtrec did not write"
    listed = doc["files"]
    for rel in files:
        name = Path(rel).name
        if not doc["complete"]:
            if rel.split("/", 1)[0] in _STAGING_NAMES.get(doc["kind"], ()) or _TEMP.match(name):
                continue
            return f"holds {rel}, which mtrec did not write"
        if _dead_temp(name):
            continue
        entry = listed.get(rel)
        if not (isinstance(entry, list) and len(entry) == 2):
            return f"holds {rel}, which mtrec did not write"
        path = folder / rel
        if path.stat().st_size != entry[0] or _sha256(path) != entry[1]:
            return f"holds {rel}, which was changed after mtrec wrote it"
    if whole and doc["complete"] and any(not (folder / rel).is_file() for rel in listed):
        return "is missing files of its manifest"
    return None


def _refuse_unowned(folder: Path, kinds: Iterable[str], what: str) -> None:
    problem = owned_problem(folder, kinds)
    if problem is not None:
        raise MtrecError(f"{folder}: {problem}; refusing to replace it (it is not {what})")


def _remove_tree(folder: Path) -> None:
    """Deletes ``folder`` bottom-up without following links (a link itself is unlinked);
    the marker goes last, so an interrupted removal stays provably mtrec's."""
    if folder.is_symlink() or not folder.is_dir():
        folder.unlink(missing_ok=True)
        return
    for root, dirnames, filenames in os.walk(folder, topdown=False):
        base = Path(root)
        for f in filenames:
            if base != folder or f != MARKER:
                (base / f).unlink()
        for d in dirnames:
            (base / d).unlink() if (base / d).is_symlink() else (base / d).rmdir()
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


def remove_owned(folder: Path) -> None:
    """Deletes a folder mtrec wrote (the caller has checked it), its marker last."""
    if folder.exists() or folder.is_symlink():
        _remove_tree(folder)


# ----------------------------------------------------------------------------- recovery
def is_sealed(folder: Path) -> bool:
    """Whether ``folder`` is a complete mtrec output (its manifest was written at the end)."""
    doc = read_marker(folder)
    return doc is not None and doc["complete"]


def _needs_recovery(path: Path) -> bool:
    temps = _temps(path)
    if any(role == "old" for _, _, _, role in temps):
        return True
    if any(not _alive(host, pid) for _, host, pid, _ in temps):
        return True
    return is_sealed(path.with_name(path.name + ".incomplete"))


def recover(path: str | Path) -> None:
    """Finishes or rolls back a swap of ``path`` that a crash interrupted; removes dead writers' temporaries.

    A sealed (complete) staging folder is the commit point: if one exists, it becomes
    ``path`` (the run finished; only the swap was cut short), but only over a ``path``
    that is itself provably mtrec's. Otherwise a displaced old output goes back, if it
    is whole. Safe to call at any time; it does nothing when nothing is pending, and
    nothing while another process holds ``path``.
    """
    path = _absolute(path)
    if not path.parent.is_dir() or not _needs_recovery(path):
        return
    with _lock(path, refuse=False) as held:
        if held:
            _recover_locked(path)


def _recover_locked(path: Path) -> None:
    temps = [(p, role) for p, host, pid, role in _temps(path) if not _alive(host, pid)]
    incomplete = path.with_name(path.name + ".incomplete")
    stages = [p for p, role in temps if role == "stage" and is_sealed(p)]
    if is_sealed(incomplete):
        stages.append(incomplete)
    if stages:
        # Raises (and keeps the sealed output) if ``path`` is something mtrec did not write.
        _swap_in(max(stages, key=lambda p: (p / MARKER).stat().st_mtime), path)
    elif not path.exists() and not path.is_symlink():
        whole = [p for p, role in temps if role == "old" and _whole(p)]
        if whole:
            os.replace(max(whole, key=lambda p: (p / MARKER).stat().st_mtime), path)
    for p, _ in temps:
        if p.exists() or p.is_symlink():
            _remove_tree(p)


def _whole(folder: Path) -> bool:
    doc = read_marker(folder)
    return doc is not None and doc["complete"] and owned_problem(folder, (doc["kind"],), whole=True) is None


def _swap_in(staging: Path, path: Path) -> None:
    """Renames sealed ``staging`` to ``path``, an old output (provably mtrec's) out of the way first."""
    doc = read_marker(staging)
    kind = doc["kind"] if doc else ""
    for name in doc.get("discard", []) if doc else []:
        entry = staging / name
        if entry.is_dir() and not entry.is_symlink():
            for root, _, filenames in os.walk(entry):
                for f in filenames:
                    (Path(root) / f).unlink()
                    fault_point("swap:discarding")
            _remove_tree(entry)
    old = None
    if path.exists() or path.is_symlink():
        # Checked again here, under the lock: the output may have changed since it was claimed.
        problem = None
        if path.is_symlink() or not path.is_dir():
            problem = "is not a folder"
        elif any(path.iterdir()):
            problem = owned_problem(path, (kind,))
        if problem is not None:
            raise MtrecError(f"{path}: {problem}; refusing to replace it (the new output is kept in {staging})")
        old = _temp_name(path, "old")
        os.replace(path, old)
    fault_point("swap:between-renames")
    os.replace(staging, path)
    fault_point("swap:after-renames")
    if old is not None:
        _remove_tree(old)


# ----------------------------------------------------------------------------- claiming outputs
def _inside_mtrec_folder(path: Path) -> Path | None:
    for parent in path.parents:
        if read_marker(parent) is not None:
            return parent
    return None


def _check_inputs(path: Path, inputs: Iterable[str | Path]) -> None:
    """An output is never an input, a folder holding one, or inside an input folder."""
    target = path.resolve()
    for item in inputs:
        real = Path(os.path.realpath(item))
        if real == target or target in real.parents or real in target.parents:
            raise MtrecError(f"{path}: is (or holds, or lies inside) the input {item}; choose another output")


def check_file_output(path: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Checks that file ``path`` may be written; returns it absolute. Call it under :func:`claim_output`."""
    path = output_path(path)
    if path.is_dir():
        raise MtrecError(f"{path}: is a folder, expected a file name")
    _check_inputs(path, inputs)
    owner = _inside_mtrec_folder(path)
    if owner is not None:
        raise MtrecError(f"{path}: lies inside {owner}, a folder written by mtrec; choose another output")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise MtrecError(f"{path}: already exists (pass --overwrite to replace it)")
    return path


@contextmanager
def claim_output(
    path: str | Path,
    *,
    kind: str | None,
    overwrite: bool,
    inputs: Iterable[str | Path] = (),
    what: str = "",
) -> Iterator[Path]:
    """Holds the lock of output ``path`` and checks it may be written; yields it absolute.

    Args:
        path: The file (``kind=None``) or folder to write.
        kind: The kind of folder output (``model``, ``dataset``, ``scores``, ``export``,
            ``report``); an existing folder is replaced only if it is one of these.
        overwrite: Whether an existing output may be replaced.
        inputs: Paths the command reads; the output may not be, hold or lie inside one.
        what: Names the kind in refusals, e.g. ``"an mtrec model directory"``.
    """
    path = output_path(path)
    if path.name.endswith(".incomplete"):
        raise MtrecError(f"{path}: names ending in .incomplete are mtrec's unfinished training runs; choose another")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        _recover_locked(path)
        if kind is None:
            checked = check_file_output(path, overwrite=overwrite, inputs=inputs)
            fault_point("claimed")
            yield checked
            return
        _check_inputs(path, inputs)
        owner = _inside_mtrec_folder(path)
        if owner is not None:
            raise MtrecError(f"{path}: lies inside {owner}, a folder written by mtrec; choose another output")
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise MtrecError(f"{path}: already exists (pass --overwrite to replace it)")
            if path.is_symlink() or not path.is_dir():
                raise MtrecError(f"{path}: exists and is not a folder")
            if any(path.iterdir()):
                _refuse_unowned(path, (kind,), what or f"an mtrec {kind} folder")
                if not is_sealed(path):
                    raise MtrecError(f"{path}: is an unfinished mtrec folder of another run; refusing to replace it")
        fault_point("claimed")
        yield path


def new_staging(path: Path, kind: str, *, name: Path | None = None, overwrite: bool = False) -> Path:
    """A fresh, empty staging folder for ``path`` (marked unfinished), under the caller's claim.

    ``name`` is the staging folder to use (training's ``DIR.incomplete``); by default a
    temporary name. An existing unfinished one is removed only if it is provably mtrec's.
    """
    staging = name if name is not None else _temp_name(path, "stage")
    if staging.is_dir() and not staging.is_symlink() and not any(staging.iterdir()):
        staging.rmdir()  # a crash between its mkdir and its marker: nothing to keep
    if staging.exists() or staging.is_symlink():
        if not overwrite:
            raise MtrecError(f"{staging}: already exists (pass --overwrite to start over)")
        _refuse_unowned(staging, (kind,), f"an unfinished mtrec {kind} folder")
        remove_owned(staging)
    try:
        staging.mkdir()
    except OSError as exc:
        raise MtrecError(f"{staging}: cannot create ({exc.strerror})") from None
    try:
        os.chmod(staging, DIR_MODE)  # a mkdir under a strict umask
        _write_marker(staging, {"format": FORMAT, "kind": kind, "complete": False, "discard": [], "files": {}})
    except BaseException:
        _remove_tree(staging)
        raise
    return staging


def commit_dir(staging: Path, path: Path, kind: str, *, discard: Sequence[str] = ()) -> None:
    """Seals ``staging`` (its manifest is the commit point) and swaps it in as ``path``.

    ``discard`` names entries of the staging folder that are not part of the output
    (training's ``resume/``); they are removed after the seal, so a crash in between
    leaves a complete folder that :func:`recover` finishes.
    """
    try:
        _seal(staging, kind, complete=True, discard=discard)
    except OSError as exc:
        raise MtrecError(f"{staging}: cannot finish writing ({exc.strerror}); {path} is unchanged") from None
    fault_point("commit:after-seal")
    _swap_in(staging, path)


@contextmanager
def claim_member(folder: str | Path, rel: str) -> Iterator[Path]:
    """Holds mtrec folder ``folder`` to write its own file ``rel`` (a model's ``evaluations/x.json``).

    The file is added to the folder's manifest, so the folder stays provably mtrec's. An
    existing file is replaced only if mtrec registered it there (a re-evaluation);
    anything else is refused. A folder that is not there is left to the caller to report.
    """
    folder = _absolute(folder)
    target = folder / rel
    if not folder.is_dir():
        yield target
        return
    recover(folder)
    with _lock(folder):
        doc = read_marker(folder)
        if doc is not None and (target.exists() or target.is_symlink()):
            entry = doc["files"].get(rel)
            ours = isinstance(entry, list) and target.is_file() and not target.is_symlink()
            if not ours or entry[1] != _sha256(target):
                raise MtrecError(f"{target}: was not written by mtrec; refusing to replace it (pass --output)")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield target
        finally:
            # Also after an error later in the caller's block: the file, once written, is mtrec's.
            if target.is_file() and not target.is_symlink():
                register_file(folder, target)


@contextmanager
def staged_dir(path: Path, kind: str) -> Iterator[Path]:
    """Yields a fresh staging folder for claimed output ``path``; commits it if the block succeeds.

    On an error before the seal the staging folder is removed; after a crash it is a
    dead writer's temporary, removed (or, if sealed, swapped in) by the next command on
    ``path``.
    """
    staging = new_staging(path, kind)
    try:
        yield staging
        commit_dir(staging, path, kind)
    finally:
        if staging.exists() and not is_sealed(staging):  # a sealed one is the result: recover() takes it
            remove_owned(staging)


def register_file(folder: Path, path: Path) -> None:
    """Adds ``path`` (written by mtrec inside mtrec folder ``folder``) to its manifest; caller holds the lock."""
    doc = read_marker(folder)
    if doc is None:
        return
    rel = path.relative_to(folder).as_posix()
    doc["files"][rel] = [path.stat().st_size, _sha256(path)]
    _write_marker(folder, doc)


# ----------------------------------------------------------------------------- atomic files
def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` for a temporary name beside ``path``, then renames it to ``path``.

    On any failure the temporary is removed and ``path`` is untouched; a full disk or
    another OS error becomes one line naming ``path``.
    """
    if path.is_dir():
        raise MtrecError(f"{path}: is a folder, expected a file name")
    if not path.parent.is_dir():
        raise MtrecError(f"{path.parent}: no such folder")
    tmp = _temp_name(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.close(fd)
        write(tmp)
        fault_point(f"write:{path.name}")
        os.chmod(tmp, FILE_MODE)  # writers that recreate the file (safetensors) leave other modes
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc).splitlines()[0]
        raise MtrecError(f"{path}: cannot write ({reason}); the previous file, if any, is unchanged") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Writes bytes (or what ``data(fh)`` writes) to ``path`` atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    write_file(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
