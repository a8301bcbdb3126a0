"""Output paths and atomic writes: a result appears complete under its final name or not at all, and never
replaces anything the user did not let it replace.

The rule every writer follows (an analysis result, an exported model, a training run, the demo, and the
attack, replay, transfer and trajectory writers to come):

1. Before any work starts, call :func:`check_output_path` on the output path. An existing path is
   accepted only if it is a folder this package wrote (it carries the :data:`MARKER` file, naming the
   same kind of content), an empty folder, or if the user passed ``overwrite=True`` / ``--overwrite``.
   Anything else raises :class:`~pysafegeom.errors.OutputExists` naming the path, so no hour of
   computation ends in a refused save.
2. Write the result inside :func:`atomic_dir` (folders) or with :func:`atomic_write_text` (files).
   ``atomic_dir`` writes into a temporary folder beside the target, adds the marker, and swaps it into
   place with one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), so at every instant the
   target name holds either the old result or the new one, complete.
3. Where the exchange is missing (other systems, some file systems) two renames are used, and the
   window between them is closed by recovery: :func:`recover` (run by ``atomic_dir``,
   ``check_output_path``, ``load_result`` and the trainer) puts a stranded ``.NAME.old-PID-HOST`` back
   when ``NAME`` is missing, and removes the ``.NAME.tmp-PID-HOST-*`` leftovers of processes that died
   (killed with SIGKILL, or a power cut). A SIGTERM that arrives while ``atomic_dir`` runs in the main
   thread cleans up first and then ends the process as SIGTERM would have.

Files the package writes are mode 0644, folders 0755.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidArgument, OutputExists

MARKER = "pysafegeom.json"  # JSON: {"written_by": "pysafegeom", "content": ..., "version": ..., "date": ...}
FILE_MODE, DIR_MODE = 0o644, 0o755

_OWNER = re.compile(r"^(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{8}))?(?:-[A-Za-z0-9_]+)?$")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-\d+(?:-[0-9a-f]{8})?(?:-[A-Za-z0-9_]+)?$")


# ---------------------------------------------------------------- the marker

def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a folder this package wrote, or None (no marker, unreadable, or not ours)."""
    f = Path(path) / MARKER
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "pysafegeom" else None


def _marker_text(content: str) -> str:
    from . import __version__

    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"written_by": "pysafegeom", "content": content, "version": __version__, "date": date}) + "\n"


def mark_dir(path: str | os.PathLike, content: str) -> Path:
    """Write the marker into an existing folder (one that a writer fills over time, e.g. a training run)."""
    return atomic_write_text(Path(path) / MARKER, _marker_text(content))


# ---------------------------------------------------------------- checking an output path

def _check_writable(folder: Path, target: Path) -> None:
    """Raise :class:`~pysafegeom.errors.OutputNotWritable` unless a file can be created in ``folder`` (tried, not
    guessed from permission bits: root, read-only mounts and ACLs all answer truly)."""
    import tempfile

    from .errors import OutputNotWritable

    try:
        fd, probe = tempfile.mkstemp(prefix=".pysafegeom-probe-", dir=folder)
    except OSError as exc:
        raise OutputNotWritable(f"cannot write {target}: its folder {folder} is not writable ({exc.strerror}); "
                                f"choose another output path") from None
    os.close(fd)
    os.unlink(probe)


def check_output_path(path: str | os.PathLike, overwrite: bool = False, kind: str = "dir", *,
                      content: str | None = None) -> Path:
    """Raise :class:`~pysafegeom.errors.OutputExists` unless ``path`` may be written; return it as a Path.

    Call it before any work starts; every writer of the package does (see the module docstring).

    kind="dir": ``path`` may be missing, an empty folder, or a folder this package wrote (it carries
    the :data:`MARKER` file; with ``content`` given, the marker must name that content, so an analysis
    result never replaces a training run). ``overwrite=True`` accepts any existing folder. A file where a
    folder is expected is refused even with ``overwrite`` (it is never deleted to make room).
    kind="file": ``path`` may be missing, or an existing file with ``overwrite=True``; a folder there is
    refused. In both kinds the nearest existing parent must be a folder. Stranded leftovers of an
    interrupted save of ``path`` are recovered first (:func:`recover`).

    A new writer (an attack store, replay, transfer, a trajectory) takes ``overwrite=False`` and does::

        out = check_output_path(out, overwrite, "dir", content="trajectory")   # before any work
        ...                                                                    # the work
        with atomic_dir(out, content="trajectory") as tmp:                     # then the save
            write everything into tmp

    (``kind="file"`` and :func:`atomic_write_text` for a single file; a folder filled over time, like a
    training run, checks first, then creates it and calls :func:`mark_dir`.)
    """
    if kind not in ("dir", "file"):
        raise InvalidArgument(f"kind must be 'dir' or 'file', got {kind!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument(f"an output path must be a string or path, got {type(path).__name__}")
    if not str(os.fspath(path)).strip():
        raise InvalidArgument("the output path is empty")
    p = Path(path)
    for a in p.parents:
        if a.exists():
            if not a.is_dir():
                raise OutputExists(f"{a} is a file, so {p} cannot be created inside it; choose another output path")
            _check_writable(a, p)
            break
    recover(p)
    if not (p.exists() or p.is_symlink()):
        return p
    how = "pass overwrite=True (--overwrite on the command line) to replace it, or choose another path"
    if kind == "file":
        if p.is_dir():
            raise OutputExists(f"{p} is a folder, not a file; choose another output path (the folder is left alone)")
        if overwrite:
            return p
        raise OutputExists(f"{p} exists; {how}")
    if p.is_symlink():
        if overwrite:
            return p  # the link itself is replaced, not what it points to
        raise OutputExists(f"{p} is a symbolic link; {how}")
    if not p.is_dir():
        raise OutputExists(f"{p} is a file, not a folder; choose another output path (the file is left alone)")
    marker = read_marker(p)
    if overwrite or (marker is not None and (content is None or marker.get("content") == content)):
        return p
    if marker is None and not any(os.scandir(p)):
        return p
    if marker is not None:
        raise OutputExists(f"{p} holds a pysafegeom {marker.get('content', 'output')!s} folder, not a "
                           f"{content} folder; {how}")
    raise OutputExists(f"{p} exists and was not written by pysafegeom (it has no {MARKER} marker file), so it is "
                       f"left alone; {how}")


# ---------------------------------------------------------------- recovery

def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # cannot tell: leave the leftover alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    try:  # a zombie (exited, not yet reaped) is dead for our purpose
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner_dead(suffix: str) -> bool:
    m = _OWNER.match(suffix)
    if m is None:
        return False  # not one of ours (or an old random-named temp): leave it
    if m["host"] is not None and m["host"] != _host_tag():
        return False  # another machine's process (shared file system): cannot tell
    return not _pid_alive(int(m["pid"]))


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def recover(target: str | os.PathLike) -> list[str]:
    """Repair what an interrupted :func:`atomic_dir` / :func:`atomic_write_text` of ``target`` left behind.

    A ``.NAME.old-*`` of a dead process is moved back to ``NAME`` when ``NAME`` is missing (the two-rename
    swap was cut between its renames) and deleted otherwise; ``.NAME.tmp-*`` of dead processes are
    deleted. Leftovers of live processes, and of other machines, are not touched. Returns what was done.
    """
    target = Path(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    olds, tmps = [], []
    for e in entries:
        for what, bucket in (("old", olds), ("tmp", tmps)):
            pre = f".{target.name}.{what}-"
            if e.name.startswith(pre) and _owner_dead(e.name[len(pre):]):
                bucket.append(target.parent / e.name)
    done = []
    if olds and not _exists(target):
        olds.sort(key=lambda p: p.lstat().st_mtime)
        keep = olds.pop()
        try:
            os.rename(keep, target)
            done.append(f"restored {target} from {keep.name}")
        except OSError:
            pass  # something took the name meanwhile: the stranded copy is then a leftover
    for p in (olds if _exists(target) else []) + tmps:
        _discard(p)
        done.append(f"removed {p.name}")
    return done


def recover_all(folder: str | os.PathLike) -> list[str]:
    """:func:`recover` for every name in ``folder`` that has leftovers beside it (e.g. a training run's checkpoints)."""
    folder = Path(folder)
    try:
        names = {m["name"] for e in os.scandir(folder) if (m := _LEFTOVER.match(e.name))}
    except OSError:
        return []
    return [msg for n in sorted(names) for msg in recover(folder / n)]


# ---------------------------------------------------------------- the steps (module functions, so tests can cut them)

def _remove_tree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif _exists(p):
        p.unlink()


def _discard(p: Path) -> None:
    """Delete a leftover; a failure is a warning (the result is already in place), not an error."""
    try:
        _remove_tree(p)
    except Exception as exc:  # noqa: BLE001 - the next recover() retries it once this process has ended
        warnings.warn(f"could not remove {p}: {exc}", RuntimeWarning, stacklevel=3)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
_renameat2 = None


def _load_renameat2():
    """A callable ``f(src: bytes, dst: bytes, flags) -> int`` (0 or -1 with errno set), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b, flags: fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    nr = _SYS_RENAMEAT2.get(platform.machine().lower())
    if nr is None:
        return None
    sc = libc.syscall
    sc.restype = ctypes.c_long
    return lambda a, b, flags: sc(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a),
                                  ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(flags))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _load_renameat2() or (lambda *_: -2)
    rc = _renameat2(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    if rc == -2:  # no renameat2 here
        return False
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fix_modes(root: Path) -> None:
    os.chmod(root, DIR_MODE)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            if not os.path.islink(os.path.join(d, n)):
                os.chmod(os.path.join(d, n), DIR_MODE)
        for n in files:
            if not os.path.islink(os.path.join(d, n)):
                os.chmod(os.path.join(d, n), FILE_MODE)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}"


class _Terminated(BaseException):
    """SIGTERM arrived while a save was running (raised so that the save cleans up first)."""


@contextmanager
def _sigterm_cleans_up():
    """In the main thread with SIGTERM at its default: turn SIGTERM into an exception until the block ends,
    then end the process with SIGTERM as it would have been."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    got = []

    def handler(signum, frame):
        if not got:  # a second SIGTERM during the clean-up is not raised again
            got.append(signum)
            raise _Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if got:
            os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------- atomic writers

@contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = True, content: str = "output"):
    """Yield a temporary folder beside ``target``; on success put it in place of ``target`` atomically.

    The folder gets the :data:`MARKER` (naming ``content``) and modes 0644/0755 before the swap. An
    existing ``target`` is exchanged with it in one step where the system can (then deleted); elsewhere
    it is renamed aside, the new folder renamed in, and the old deleted, with :func:`recover` closing the
    window. On an exception (a SIGTERM included) ``target`` is left as it was and the temporary folder
    removed. ``replace=False``: an existing ``target`` wins (another process finished first) and the new
    copy is dropped. This is the mechanism only: callers check the path first with :func:`check_output_path`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = _temp_name(target)
    old = target.parent / f".{target.name}.old-{os.getpid()}-{_host_tag()}"
    with _sigterm_cleans_up():
        try:
            tmp.mkdir(mode=DIR_MODE)
            yield tmp
            (tmp / MARKER).write_text(_marker_text(content), encoding="utf-8")
            _fix_modes(tmp)
            if not _exists(target):
                try:
                    _rename(tmp, target)
                except OSError as exc:  # someone else created it meanwhile
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                        raise
            if _exists(tmp):  # target exists: swap
                if not replace:
                    _discard(tmp)
                    return
                if _exchange(tmp, target):
                    _discard(tmp)  # the old result, now under the temporary name
                else:
                    _rename(target, old)
                    _rename(tmp, target)
                    _discard(old)
            _fsync_dir(target.parent)
        except BaseException:
            _undo(target, tmp, old)
            raise


def _undo(target: Path, tmp: Path, old: Path) -> None:
    """After an exception anywhere in :func:`atomic_dir`: the old result back in place if it was set aside,
    leftovers removed. Decided from what is on disk, so it is right whichever step was cut."""
    if _exists(old):
        if not _exists(target):
            try:
                os.rename(old, target)
            except OSError:
                pass  # recover() on the next open puts it back
        else:
            _discard(old)
    if _exists(tmp):
        _discard(tmp)


def json_safe(x):
    """``x`` with every non-finite float (NaN, inf) replaced by None, through dicts, lists and tuples: what every
    result writes to JSON (``allow_nan=False``), and the one place that rule lives."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write_text` for bytes (e.g. a ``torch.save`` into a buffer)."""
    return _atomic_write(Path(path), data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path`` (never a half-written
    file; mode 0644). This is the mechanism only: callers check the path first with :func:`check_output_path`."""
    return _atomic_write(Path(path), text.encode(encoding))


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        _rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = ["MARKER", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "json_safe", "check_output_path", "mark_dir", "read_marker", "recover",
           "recover_all"]
