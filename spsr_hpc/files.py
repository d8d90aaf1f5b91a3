"""Writing output files so that a failed write loses nothing and says why in one line.

Every file the command-line tools write (SR images, evaluation reports, exports, shards) goes
to ``<name>.tmp`` first and is renamed into place only when complete, so a full disk, a quota
or a kill never leaves a truncated file under the real name, and never replaces a good one.
A write that fails removes its ``.tmp`` and raises :class:`OutputWriteError`: the path, the OS
reason (``[Errno 28] No space left on device (ENOSPC)``), what is kept and what to do. The
entry points print it as one ``error:`` line and exit with status 4 (:data:`EXIT_WRITE`), the
status a failed checkpoint write has in training.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

EXIT_WRITE = 4  # the training status of a failed checkpoint write (spsr_hpc/train/faults.py)

# torch.save's zip writer on a full disk: "[enforce fail at inline_container.cc:672] . unexpected pos"
_SHORT_WRITE = ("unexpected pos", "inline_container", "PytorchStreamWriter failed")
# safetensors (Rust): "Error while serializing: I/O error: No space left on device (os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class OutputWriteError(Exception):
    """An output file could not be written; its ``.tmp`` is gone and the old file is unchanged."""

    exit_code = EXIT_WRITE

    def __init__(self, path: str | os.PathLike, reason: str, kept: str = "") -> None:
        self.path, self.reason, self.kept = Path(path), reason, kept
        what = f" {kept}." if kept else ""
        fix = write_advice(reason)
        fix = f"{fix}, or write to another folder" if fix else "Write to another folder"
        super().__init__(f"could not write {path}: {reason}.{what} {fix}, then re-run the same command")


def write_advice(reason: str) -> str:
    """What to do about a failed write, from its reason: "Free space there (or raise the quota)"
    for a full disk or quota, "Make the folder writable" for a permission or read-only error,
    "" otherwise."""
    if any(s in reason for s in ("ENOSPC", "EDQUOT", "EFBIG", "not written in full")):
        return "Free space there (or raise the quota)"
    if any(s in reason for s in ("EACCES", "EPERM", "EROFS")):
        return "Make the folder writable"
    return ""


def describe_write_error(exc: BaseException) -> str:
    """The OS reason of a failed write in words: ``[Errno 28] No space left on device (ENOSPC)``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        # The .tmp a writer was writing is not worth naming: the message names the real file.
        where = f" ({exc.filename})" if exc.filename and not str(exc.filename).endswith(".tmp") else ""
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)} ({name}){where}"
    text = " ".join(str(exc).split())
    m = _RUST_OS_ERROR.search(text)
    if m:
        code = int(m.group(1))
        return f"[Errno {code}] {os.strerror(code)} ({errno.errorcode.get(code, code)})"
    if any(s in text for s in _SHORT_WRITE):
        return (
            f"the file was not written in full ({type(exc).__name__}: {text[:160]}): the disk or the "
            "quota is full, or a file size limit (ulimit -f: EFBIG) was reached"
        )
    return f"{type(exc).__name__}: {text[:300]}"


def is_write_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write (an OSError, or a writer library's wrapped one)."""
    if isinstance(exc, OutputWriteError):
        return False  # already described
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return bool(_RUST_OS_ERROR.search(text)) or any(s in text for s in _SHORT_WRITE)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, kept: str = "") -> Iterator[Path]:
    """Yield ``<path>.tmp`` to write; rename it to ``path`` when the block succeeds.

    When the block (or the rename) fails, the ``.tmp`` is removed and ``path`` is unchanged; a
    failed write becomes :class:`OutputWriteError` (``kept`` says what the user still has),
    other exceptions pass through.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException as exc:
        _unlink_quietly(tmp)
        if is_write_error(exc):
            raise OutputWriteError(path, describe_write_error(exc), kept) from exc
        raise


def write_all_or_none(files: Sequence[tuple[Path, str]], kept: str = "") -> None:
    """Write several text files so that either all are replaced or none is.

    Each goes to its ``.tmp`` first; only when every one is complete are they renamed, so a
    reader never pairs a new file with an old one (a report with another run's CSV).
    """
    tmps = [p.with_name(p.name + ".tmp") for p, _ in files]
    current = files[0][0] if files else Path()
    try:
        for (path, text), tmp in zip(files, tmps):
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", newline="") as fh:
                fh.write(text)
        for (path, _), tmp in zip(files, tmps):
            current = path
            tmp.replace(path)
    except BaseException as exc:
        for tmp in tmps:
            _unlink_quietly(tmp)
        if is_write_error(exc):
            raise OutputWriteError(current, describe_write_error(exc), kept) from exc
        raise


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """ValueError when ``path`` (an output folder given as ``flag``), or the nearest of its parents
    that exists, is not a folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is a file, not a folder: choose another {flag}")
    _check_parents(p, flag)


def _check_parents(p: Path, flag: str) -> None:
    """ValueError when the nearest existing parent of ``p`` is a file (``p`` cannot be created)."""
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {p}: {parent} is a file, not a folder: choose another {flag}")
            return


def check_output_file(path: str | os.PathLike, flag: str, example: str) -> None:
    """ValueError when ``path`` (an output file given as ``flag``) is an existing folder, or its
    parent is a file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder: name a file, e.g. {flag} {p / example}")
    _check_parents(p, flag)


__all__ = [
    "EXIT_WRITE",
    "OutputWriteError",
    "atomic_output",
    "check_output_file",
    "check_output_folder",
    "describe_write_error",
    "is_write_error",
    "write_advice",
    "write_all_or_none",
]
