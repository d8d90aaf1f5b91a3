"""make_shards: folders of HR (and LR) images → WebDataset tar shards + DALI indexes + manifest.

Layout of the output folder::

    shard-000000.tar   samples <key>.hr.png, <key>.lr.png, <key>.json (in this order)
    shard-000000.idx   DALI index (wds2idx format v1.2) of that shard
    ...
    manifest.json      counts, sizes, sha256 of each shard, parameters, the command,
                       skipped files with reasons, conversions; written last

``manifest.json`` is the completion marker: it is removed before any shard is rewritten and
written (atomically) only after every shard is complete, and every shard is written under a
``.tmp`` name and renamed. A folder without a manifest is an unfinished run.

Keys never contain dots (DALI and WebDataset split the member name at the first dot).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shlex
import signal
import sys
import tarfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from spsr_hpc.data.images import BadImageError, encode_png, find_lr_match, list_images, read_rgb
from spsr_hpc.data.imresize import imresize, modcrop, to_uint8
from spsr_hpc.files import (
    OutputWriteError,
    atomic_output,
    check_output_folder,
    describe_write_error,
    is_write_error,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"  # of the default prefix ("shard"); another prefix P: P.manifest.json
MANIFEST_VERSION = 1
DEFAULT_PREFIX = "shard"
_SHARD_NAME = re.compile(r"(.+)-\d{6}\.tar")
INDEX_VERSION = "v1.2"  # DALI's wds2idx index format


def _prefix_of(shard_name: str) -> str | None:
    """``x4-000012.tar`` -> ``x4``; None for a name make_shards does not write."""
    m = _SHARD_NAME.fullmatch(shard_name)
    return m.group(1) if m else None


def manifest_name(prefix: str = DEFAULT_PREFIX) -> str:
    """The manifest of the shards ``<prefix>-NNNNNN.tar``: ``manifest.json`` for the default prefix,
    ``<prefix>.manifest.json`` for another, so that sets of several prefixes share a folder (one
    manifest.json for all made each run replace the other's)."""
    return MANIFEST_NAME if prefix == DEFAULT_PREFIX else f"{prefix}.{MANIFEST_NAME}"


def folder_manifests(folder: str | Path) -> list[Path]:
    """The manifest files in a folder, ``manifest.json`` first."""
    folder = Path(folder)
    found = [folder / MANIFEST_NAME] if (folder / MANIFEST_NAME).is_file() else []
    return found + sorted(p for p in folder.glob(f"*.{MANIFEST_NAME}") if p.is_file())


def shard_manifests(folder: str | Path) -> dict[str, tuple[dict, dict]]:
    """Shard file name -> (its manifest entry, its manifest) for every readable manifest in
    ``folder``. A shard listed by two (an old-style ``manifest.json`` next to its prefix's own) is
    taken from its prefix's manifest."""
    out: dict[str, tuple[dict, dict]] = {}
    for path in folder_manifests(folder):
        try:
            manifest = _read_manifest_file(path)
        except ValueError:
            continue  # an unreadable manifest is reported by the shard resolution itself
        for entry in manifest["shards"]:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                continue
            prefix = _prefix_of(name)
            own = prefix is not None and path.name == manifest_name(prefix)
            if own or name not in out:
                out[name] = (entry, manifest)
    return out


@dataclass(frozen=True)
class ShardParams:
    """Everything that determines the shards' content (part of the re-run fingerprint)."""

    scale: int
    crop_size: int | None  # HR sub-image size; None = whole images
    step: int | None  # HR sub-image stride
    shard_size_bytes: int
    compress_level: int
    prefix: str


@dataclass
class _Sample:
    key: str
    hr_png: bytes
    lr_png: bytes
    meta: dict


@dataclass
class _FileResult:
    source: str
    samples: list[_Sample] = field(default_factory=list)
    skipped: str | None = None
    conversions: list[str] = field(default_factory=list)


def crop_positions(length: int, crop: int, step: int) -> list[int]:
    """Sub-image start positions along one axis, as BasicSR's extract_subimages (thresh 0).

    Starts at 0 every ``step`` pixels, plus a last crop flush with the end when the regular
    grid leaves pixels uncovered. Empty when ``length < crop``.
    """
    if length < crop:
        return []
    starts = list(range(0, length - crop + 1, step))
    if starts[-1] + crop < length:
        starts.append(length - crop)
    return starts


def _process_file(job: tuple[str, str, str | None, str | None, ShardParams]) -> _FileResult:
    """Worker: read one HR (+ LR) file and produce its encoded samples."""
    hr_path, key_base, lr_path, rel_source, params = job
    result = _FileResult(source=rel_source or hr_path)
    s = params.scale
    try:
        hr, conv = read_rgb(hr_path)
        if conv:
            result.conversions.append(f"HR {conv}")
        h0, w0 = hr.shape[:2]
        hr = modcrop(hr, s)
        h, w = hr.shape[:2]
        if h == 0 or w == 0:
            result.skipped = f"HR image {w0}x{h0} is smaller than the scale {s}"
            return result
        if lr_path is not None:
            lr, conv = read_rgb(lr_path)
            if conv:
                result.conversions.append(f"LR {conv}")
            if lr.shape[:2] != (h // s, w // s):
                result.skipped = (
                    f"LR/HR size mismatch: LR {Path(lr_path).name} is {lr.shape[1]}x{lr.shape[0]}, "
                    f"HR is {w0}x{h0} (mod-cropped {w}x{h}), expected LR {w // s}x{h // s} at scale {s}"
                )
                return result
        else:
            lr = to_uint8(imresize(hr.astype(np.float64) / 255.0, 1.0 / s))
    except BadImageError as exc:
        result.skipped = str(exc)
        return result

    if params.crop_size is None:
        boxes = [(0, 0, h, w)]
    else:
        c, st = params.crop_size, params.step
        ys, xs = crop_positions(h, c, st), crop_positions(w, c, st)
        if not ys or not xs:
            result.skipped = f"HR image {w}x{h} (mod-cropped) is smaller than the crop size {c}"
            return result
        boxes = [(y, x, c, c) for y in ys for x in xs]
    for i, (y, x, ch, cw) in enumerate(boxes):
        hr_crop = hr[y : y + ch, x : x + cw]
        lr_crop = lr[y // s : (y + ch) // s, x // s : (x + cw) // s]
        key = key_base if params.crop_size is None else f"{key_base}_s{i:03d}"
        meta = {
            "source": result.source,
            "lr_source": None if lr_path is None else Path(lr_path).name,
            "lr_generated": lr_path is None,
            "scale": s,
            "source_size": [h0, w0],
            "hr_size": [ch, cw],
            "lr_size": [ch // s, cw // s],
            "crop": None if params.crop_size is None else [y, x],
        }
        result.samples.append(
            _Sample(
                key,
                encode_png(hr_crop, params.compress_level),
                encode_png(lr_crop, params.compress_level),
                meta,
            )
        )
    return result


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through (so shards are not read twice)."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha256 = hashlib.sha256()
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self._f.write(b)
        self.sha256.update(memoryview(b)[:n])
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        super().close()


class _ShardWriter:
    """Writes samples into size-capped shards, each under a .tmp name until complete."""

    def __init__(self, out_dir: Path, params: ShardParams):
        self.out_dir, self.params = out_dir, params
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._file: _HashingFile | None = None
        self._index: list[str] = []

    def _path(self, i: int, ext: str) -> Path:
        return self.out_dir / f"{self.params.prefix}-{i:06d}.{ext}"

    def _open(self) -> None:
        i = len(self.shards)
        self._file = _HashingFile(self._path(i, "tar.tmp"))
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._index = []

    def _add_member(self, name: str, data: bytes) -> tuple[int, int]:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible shards
        self._tar.addfile(info, io.BytesIO(data))
        data_offset = self._tar.offset - 512 * math.ceil(len(data) / 512)
        return data_offset, len(data)

    def add(self, sample: _Sample) -> None:
        size = len(sample.hr_png) + len(sample.lr_png) + 3 * 512 + 1024
        if (
            self._tar is not None
            and self._file.pos > 0
            and self._file.pos + size > self.params.shard_size_bytes
        ):
            self._close()
        if self._tar is None:
            self._open()
        parts = []
        for ext, data in (
            ("hr.png", sample.hr_png),
            ("lr.png", sample.lr_png),
            ("json", json.dumps(sample.meta, sort_keys=True).encode()),
        ):
            name = f"{sample.key}.{ext}"
            offset, n = self._add_member(name, data)
            parts.append(f"{ext} {offset} {n} {name}")
        self._index.append(" ".join(parts))

    def _close(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()  # writes the end-of-archive blocks through _HashingFile
        self._file.close()
        i = len(self.shards)
        idx_tmp = self._path(i, "idx.tmp")
        idx_tmp.write_text(f"{INDEX_VERSION} {len(self._index)}\n" + "\n".join(self._index) + "\n")
        idx_tmp.replace(self._path(i, "idx"))
        tar_tmp = self._path(i, "tar.tmp")
        size = tar_tmp.stat().st_size
        tar_tmp.replace(self._path(i, "tar"))
        self.shards.append(
            {
                "name": self._path(i, "tar").name,
                "index": self._path(i, "idx").name,
                "samples": len(self._index),
                "bytes": size,
                "sha256": self._file.sha256.hexdigest(),
            }
        )
        self._tar = self._file = None

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards

    def current(self) -> Path:
        """The shard being written (or the next one)."""
        return self._path(len(self.shards), "tar")

    def abort(self) -> None:
        """Close and remove the unfinished shard's .tmp files (a write may have failed: a full
        disk fails the close too, which is ignored here)."""
        if self._tar is not None:
            with contextlib.suppress(OSError, tarfile.TarError):
                self._tar.close()
            with contextlib.suppress(OSError):
                self._file.close()
            self._tar = self._file = None
        for ext in ("tar.tmp", "idx.tmp"):
            with contextlib.suppress(OSError):
                self._path(len(self.shards), ext).unlink(missing_ok=True)


def _written(writer: _ShardWriter, write: Any, *args: Any) -> Any:
    """``write(*args)``; a failed write (full disk, quota) becomes OutputWriteError naming the
    shard and what is left. Only the writes: a failure to start workers is not a full disk."""
    try:
        return write(*args)
    except Exception as exc:
        if not is_write_error(exc):
            raise
        out = writer.out_dir
        raise OutputWriteError(
            out / writer.current().name, describe_write_error(exc),
            f"{len(writer.shards)} complete shard(s) are in {out}, but the run is unfinished (no "
            f"{manifest_name(writer.params.prefix)}: training refuses the folder) and the re-run writes "
            "every shard again",
        ) from exc


def _safe_key(stem: str) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:60]
    return key or "img"


def _file_fingerprint(paths: list[Path]) -> list[list]:
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:  # a broken link: skipped with its reason when it is read
            st = p.lstat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def _adopt_old_manifest(out: Path) -> None:
    """A folder made before prefixes had their own manifests: a ``manifest.json`` that lists only
    shards of another prefix P is that set's manifest, so it becomes ``P.manifest.json`` (a stale
    copy when that exists: removed). The set stays listed (a run of the default prefix replaces
    manifest.json), and a re-run of P with the same inputs finds it and does nothing."""
    old = out / MANIFEST_NAME
    if not old.is_file():
        return
    try:
        names = [s["name"] for s in _read_manifest_file(old)["shards"]]
    except (ValueError, KeyError, TypeError):
        return
    prefixes = {_prefix_of(n) for n in names}
    prefix = prefixes.pop() if len(prefixes) == 1 else None
    if prefix in (None, DEFAULT_PREFIX):
        return
    if (out / manifest_name(prefix)).exists():
        old.unlink()
    else:
        old.rename(out / manifest_name(prefix))


def _manifest_is_current(out_dir: Path, fingerprint: str, prefix: str) -> dict | None:
    path = out_dir / manifest_name(prefix)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for shard in manifest.get("shards", []):
        tar, idx = out_dir / shard["name"], out_dir / shard["index"]
        if not idx.is_file() or not tar.is_file() or tar.stat().st_size != shard["bytes"]:
            return None
    return manifest


def read_manifest(out_dir: str | Path, prefix: str | None = None) -> dict:
    """The manifest of a finished make_shards run in ``out_dir`` (of ``prefix``'s shards, or the
    folder's only one); ValueError when the run did not finish, or when the folder holds several
    sets and no prefix is given."""
    if prefix is None:
        found = folder_manifests(out_dir)
        if len(found) > 1:
            sets = ", ".join(p.name for p in found)
            raise ValueError(
                f"{out_dir} holds several shard sets ({sets}): name one, e.g. data.shards="
                f"{Path(out_dir) / 'PREFIX-*.tar'} (the prefix of that set's shard files)"
            )
        path = found[0] if found else Path(out_dir) / MANIFEST_NAME
    else:
        path = Path(out_dir) / manifest_name(prefix)
    if not path.is_file():
        raise ValueError(
            f"{path} not found: {out_dir} is not a finished make_shards output (the manifest is written "
            "last); re-run make_shards"
        )
    return _read_manifest_file(path)


def _read_manifest_file(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); re-run make_shards with --force") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path} is not a make_shards manifest (no 'shards' list); re-run make_shards")
    return manifest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_shards(shards: list[str], mode: str = "size") -> list[tuple[str, str]]:
    """Compare shards with the manifest entries of their folders (``data.verify_shards``).

    ``mode`` "size" compares the byte size (a stat per shard), "sha256" also the content hash
    (reads every byte), "off" nothing. Shards whose folder has no manifest.json, or which it does
    not list, are not checked. Returns (shard, what differs) for each mismatch.
    """
    if mode == "off":
        return []
    if mode not in ("size", "sha256"):
        raise ValueError(f"verify mode must be size, sha256 or off, got {mode!r}")
    by_dir: dict[Path, list[Path]] = {}
    for sh in shards:
        by_dir.setdefault(Path(sh).parent, []).append(Path(sh))
    out: list[tuple[str, str]] = []
    for folder, paths in by_dir.items():
        entries = shard_manifests(folder)  # every set's manifest: several prefixes share a folder
        for path in paths:
            entry = entries.get(path.name, (None, None))[0]
            if entry is None:
                continue
            try:
                size = path.stat().st_size
            except OSError as e:
                out.append((str(path), f"cannot be read ({e.strerror})"))
                continue
            if "bytes" in entry and size != int(entry["bytes"]):
                out.append((str(path), f"{size} bytes, the manifest says {entry['bytes']}"))
            elif mode == "sha256" and entry.get("sha256") and _sha256_file(path) != entry["sha256"]:
                out.append((str(path), "sha256 differs from the manifest's (same size: the content changed)"))
    return out


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops them and reports once (each worker
    printed its own KeyboardInterrupt traceback before)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_context() -> mp.context.BaseContext:
    """Start method of the conversion workers: never a fork of the calling process.

    A forked worker inherits whatever the caller holds that is not fork-safe: found in the test
    suite, a DALI pipeline awaiting garbage collection was collected inside the fork, and its
    ``__del__`` waited forever for DALI threads that exist only in the parent (the main job's
    shard step hung). Workers come from a forkserver (Linux; one clean server process per caller,
    this module imported there once) or are spawned (macOS, Windows).
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # no effect once this caller's server runs
        return ctx
    return mp.get_context("spawn")


def write_shards(
    hr_dir: str | Path,
    out_dir: str | Path,
    *,
    lr_dir: str | Path | None = None,
    scale: int = 4,
    crop_size: int | None = None,
    step: int | None = None,
    shard_size_mb: float = 256.0,
    compress_level: int = 1,
    prefix: str = "shard",
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Pack a folder of HR images (and optionally matching LR images) into tar shards.

    Args:
        hr_dir: folder of HR images (png/jpg/bmp/tif/webp/ppm, not recursive).
        out_dir: output folder (created). Other files in it are left alone, except shards of
            the same ``prefix`` from an earlier run, which are replaced.
        lr_dir: folder of LR images matched to HR by name (``0001.png`` ↔ ``0001.png``,
            ``0001x4.png`` or ``0001_x4.png``). Without it, LR = ``to_uint8(imresize(HR, 1/scale))``
            of the mod-cropped HR (MATLAB bicubic, as DIV2K's official LR).
        scale: integer SR scale; HR is mod-cropped to it and LR must be exactly HR / scale.
        crop_size, step: optional HR sub-image extraction (e.g. 480 and 240 for DIV2K); the LR
            crop is taken at the HR position / scale. Both must be multiples of ``scale``.
        shard_size_mb: target shard size; a shard is closed before it would exceed it (a single
            larger sample gets a shard of its own).
        compress_level: PNG zlib level of the stored images (0-9).
        prefix: shard file name prefix (``<prefix>-000000.tar``).
        workers: processes encoding images (default: all cores; 0 or 1 = in this process).
        force: rewrite even when a finished run with the same inputs and parameters exists.
        progress: show a tqdm progress bar.
        command: the command recorded in the manifest (default: this process's argv).

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: bad parameters, a missing folder, or no usable image at all (the message
            lists the first skip reasons). Individual bad files never raise: they are skipped
            with a warning and listed in the manifest under ``skipped``.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if (crop_size is None) != (step is None):
        raise ValueError(f"crop_size and step go together, got crop_size={crop_size!r}, step={step!r}")
    if crop_size is not None and (crop_size <= 0 or step <= 0 or crop_size % scale or step % scale):
        raise ValueError(
            f"crop_size ({crop_size}) and step ({step}) must be positive multiples of scale ({scale}) "
            "so that LR crops align with HR crops"
        )
    if not shard_size_mb > 0:
        raise ValueError(f"shard_size_mb must be positive, got {shard_size_mb!r}")
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be in 0..9, got {compress_level!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-', got {prefix!r}")
    params = ShardParams(scale, crop_size, step, int(shard_size_mb * 2**20), compress_level, prefix)

    hr_files = list_images(hr_dir)
    lr_files = list_images(lr_dir) if lr_dir is not None else []
    if not hr_files:
        raise ValueError(f"no image files found in HR folder {str(hr_dir)!r}")
    out = Path(out_dir)
    check_output_folder(out, "--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(out, describe_write_error(exc)) from exc
    fingerprint = hashlib.sha256(
        json.dumps(
            {"params": asdict(params), "hr": _file_fingerprint(hr_files), "lr": _file_fingerprint(lr_files)},
            sort_keys=True,
        ).encode()
    ).hexdigest()
    _adopt_old_manifest(out)
    if not force:
        current = _manifest_is_current(out, fingerprint, prefix)
        if current is not None:
            log.info("%s is up to date (%d samples); nothing to do", out, current["num_samples"])
            return current

    # From here on the set is "unfinished" until its new manifest lands.
    mine = manifest_name(prefix)
    (out / mine).unlink(missing_ok=True)

    skipped: list[dict] = []
    lr_by_stem = {p.stem: p for p in lr_files}
    jobs = []
    used_keys: set[str] = set()
    for p in hr_files:
        lr_path = None
        if lr_dir is not None:
            lr_path = find_lr_match(p.stem, lr_by_stem, scale)
            if lr_path is None:
                skipped.append({"file": p.name, "reason": f"no matching LR image in {lr_dir}"})
                continue
        key = _safe_key(p.stem)
        base, n = key, 1
        while key in used_keys:  # a.png and a.jpg, or names equal after sanitising
            key, n = f"{base}_{n}", n + 1
        used_keys.add(key)
        jobs.append((str(p), key, None if lr_path is None else str(lr_path), p.name, params))

    n_workers = min(os.cpu_count() or 1, len(jobs)) if workers is None else min(workers, len(jobs))
    writer = _ShardWriter(out, params)
    conversions: list[dict] = []
    n_samples = 0
    pool = None
    try:
        if n_workers > 1:
            pool = _worker_context().Pool(n_workers, initializer=_ignore_sigint)
            results = pool.imap(_process_file, jobs, chunksize=1)  # ordered: shards are deterministic
        else:
            results = map(_process_file, jobs)
        bar = tqdm(results, total=len(jobs), desc="make_shards", unit="img", disable=not progress)
        for res in bar:
            if res.skipped is not None:
                msg = f"make_shards: skipping {res.source}: {res.skipped}"
                if progress:
                    bar.write(f"warning: {msg}", file=sys.stderr)  # above the bar, not through it
                else:
                    warnings.warn(msg, stacklevel=2)
                skipped.append({"file": res.source, "reason": res.skipped})
                continue
            conversions += [{"file": res.source, "conversion": c} for c in res.conversions]
            for sample in res.samples:
                _written(writer, writer.add, sample)
                n_samples += 1
        shards = _written(writer, writer.finish)
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    keep = {s["name"] for s in shards} | {s["index"] for s in shards}
    for stale in out.glob(f"{prefix}-*"):
        if stale.name not in keep and re.fullmatch(
            rf"{re.escape(prefix)}-\d{{6}}\.(tar|idx)(\.tmp)?", stale.name
        ):
            stale.unlink()
    if n_samples == 0:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:5])
        raise ValueError(f"make_shards wrote no sample from {hr_dir}: every file was skipped ({reasons})")

    manifest = {
        "version": MANIFEST_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command if command is not None else shlex.join([sys.executable, *sys.argv]),
        "hr_dir": str(Path(hr_dir).resolve()),
        "lr_dir": None if lr_dir is None else str(Path(lr_dir).resolve()),
        "lr_generated": lr_dir is None,
        "params": asdict(params),
        "fingerprint": fingerprint,
        "num_files": len(hr_files),
        "num_samples": n_samples,
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "skipped_count": len(skipped),
        "skipped": skipped,
        "converted_count": len(conversions),
        "converted": conversions,
    }
    kept = f"Every shard is complete in {out}, but without {mine} the run is unfinished"
    with atomic_output(out / mine, kept) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


make_shards = write_shards
