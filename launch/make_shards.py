r"""Pack HR (and LR) image folders into WebDataset tar shards with DALI indexes and a manifest.

    python launch/make_shards.py --hr DIV2K/DIV2K_train_HR --lr DIV2K/DIV2K_train_LR_bicubic/X4 \
        --out data/div2k_shards --scale 4 --crop 480 --step 240
    python launch/make_shards.py --bundled --out data/bundled_x4 --scale 4   # skimage photos, in out/photos
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from spsr_hpc.data import export_bundled_photos, write_shards
from spsr_hpc.data.shards import manifest_name
from spsr_hpc.files import OutputWriteError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hr", help="folder of HR images")
    src.add_argument(
        "--bundled", action="store_true", help="use scikit-image's bundled photos (training split)"
    )
    parser.add_argument(
        "--lr", help="folder of matching LR images (default: made with MATLAB-style imresize)"
    )
    parser.add_argument("--out", required=True, help="output folder for shards, indexes and manifest.json")
    parser.add_argument("--scale", type=int, default=4, help="SR scale factor: LR = HR / scale (default 4)")
    parser.add_argument(
        "--crop", type=int, default=None, help="HR sub-image size (e.g. 480); default whole images"
    )
    parser.add_argument("--step", type=int, default=None, help="HR sub-image stride (e.g. 240)")
    parser.add_argument(
        "--shard-size-mb", type=float, default=256.0, help="target size of one tar shard in MiB (default 256)"
    )
    parser.add_argument(
        "--compress-level", type=int, default=1, help="PNG zlib level 0-9 (default 1: fast, larger files)"
    )
    parser.add_argument(
        "--prefix", default="shard", help="shard file names: PREFIX-000000.tar (default shard)"
    )
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    parser.add_argument(
        "--force", action="store_true", help="rewrite even if an identical finished run exists"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch jobs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bundled and args.lr:
        parser.error("--lr goes with --hr, not --bundled")
    command = shlex.join([sys.executable, *sys.argv[:1], *(sys.argv[1:] if argv is None else argv)])

    # Bundled photos are exported next to the shards (idempotently, so a re-run sees unchanged
    # files and skips the finished work).
    try:
        hr_dir = export_bundled_photos(Path(args.out) / "photos")[0] if args.bundled else args.hr
        manifest = write_shards(
            hr_dir,
            args.out,
            lr_dir=args.lr,
            scale=args.scale,
            crop_size=args.crop,
            step=args.step,
            shard_size_mb=args.shard_size_mb,
            compress_level=args.compress_level,
            prefix=args.prefix,
            workers=args.workers,
            force=args.force,
            progress=not args.no_progress,
            command=command,
        )
    except (ValueError, ModuleNotFoundError) as exc:  # bad input, or scikit-image missing for --bundled
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    except OutputWriteError as exc:  # a full disk or quota: no .tmp is left, the message says what is kept
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C: the workers are stopped, the unfinished shard's .tmp removed
        print(f"make_shards: interrupted: {args.out} holds an unfinished run (no "
              f"{manifest_name(args.prefix)}; training refuses it); re-run the same command", file=sys.stderr)
        return 130
    print(
        f"{manifest['num_samples']} samples in {manifest['num_shards']} shard(s), "
        f"{manifest['total_bytes'] / 2**20:.1f} MiB, {manifest['skipped_count']} file(s) skipped, "
        f"{manifest['converted_count']} converted -> {Path(args.out) / manifest_name(args.prefix)}"
    )
    for s in manifest["skipped"]:
        print(f"  skipped {s['file']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
