"""The DALI loader: ``fn.readers.webdataset`` over the same shards and .idx files.

On a CUDA machine images are decoded with ``device="mixed"`` and cropped, flipped and
transposed on the GPU; batches come out as CUDA tensors. Without a GPU (or with
``data.dali_device: cpu``) the same graph runs as a CPU-only pipeline (``device_id=None``).

The aligned crop: one uniform draw per axis picks the LR anchor
``floor(u · (size − p + 1))`` from the encoded LR's shape (peeked, not decoded); the HR slice
starts at ``scale ×`` that anchor. The flips use the same coins on LR and HR (``fn.flip``);
the transpose is computed for both and selected with a coin (``x + c · (xᵀ − x)``, exact for
c ∈ {0, 1}, square patches).

Split across ranks: the reader's ``shard_id = rank`` / ``num_shards = world size`` gives each
rank a disjoint contiguous part of the sample list (DALI's sharding: rank r gets samples
floor(r·n/W) .. floor((r+1)·n/W) − 1, also when W does not divide n), and ``stick_to_shard``
keeps it there: each epoch has the same fixed number of batches on every rank, and a rank that
reads past its part wraps around to the start of its own part, never into the next rank's.
Every sample of the part is read once before any is read again (DALI drains its shuffle buffer
at the end of a pass), so with the default epoch length (ceil(n / (batch · W)) batches) every
sample is read at least once per epoch and by one rank only. The tar files are listed in an
order drawn from (seed, epoch), the same on every rank, so the parts change between epochs
(DALI's own ``shuffle_after_epoch`` cannot be combined with ``stick_to_shard``).

Determinism and resume: the pipeline is rebuilt at every epoch start with seeds derived from
(seed, rank, epoch), and the tar-file order from (seed, epoch), the same on every rank.
Resuming mid-epoch rebuilds that epoch's pipeline and runs and discards the consumed batches,
so the resume is exact to the batch but costs replaying them.
Bad data stops this loader; it is not skipped. Measured with DALI 2.4's CPU pipeline (the GPU
pipeline differs only in the decoder's device, untested): DALI has no per-sample error handling
for a reader or decoder failure (``missing_component_behavior`` only covers a sample without
hr.png/lr.png, which is an error here). An undecodable image fails ``fn.decoders.image``
("nvImageCodec failure", no sample named), a truncated shard fails ``fn.readers.webdataset``
("Malformed index file ... offset is outside of the archive file"); both surface from
``pipe.run()`` one batch or so after the build (the pipeline prefetches), and the pipeline
object is invalid afterwards, so a sample cannot be skipped, and lost samples cannot be counted
into train.max_skip_rate as the WebDataset loader does. The loader instead raises
:class:`~spsr_hpc.data.loader_state.ShardReadError` with DALI's operator and reason (without its
stack) and what :func:`find_damage` finds in this rank's shards: a shard whose size differs from
its manifest, the sample keys whose PNGs do not decode, where a tar's data ends. The trainer and
NSE pretraining print it as one ``error:`` line and exit with status 6. make_shards writes only
images it decoded, so this means the shards were damaged afterwards: the default
``data.verify_shards=size`` refuses a truncated shard before any model is built, ``sha256`` also
a changed byte; the WebDataset loader skips and counts bad samples instead.
"""

from __future__ import annotations

import random
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from spsr_hpc.data.config import DataConfig
from spsr_hpc.data.images import BadImageError, decode_rgb
from spsr_hpc.data.loader_state import (
    LoaderState,
    ShardReadError,
    count_samples,
    derive_seed,
    epoch_batches,
    index_path,
    png_size,
    shard_set,
)
from spsr_hpc.data.shards import verify_shards

SCAN_BUDGET_S = 60.0
"""How long :func:`find_damage` reads shards after a DALI failure before it gives up (the other
ranks wait in a collective meanwhile; keep it well below train.collective_timeout_s)."""

DALI_EXTRAS = "pip install 'spsr-hpc[dali-cuda12]' (CUDA 12 driver) or 'spsr-hpc[dali-cuda13]' (CUDA 13)"


def dali_missing_message() -> str | None:
    """None when ``nvidia.dali`` imports, else a one-line message naming the extras to install."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return (f"data.loader=dali needs NVIDIA DALI, which does not import ({e}); {DALI_EXTRAS}, "
                "or use data.loader=webdataset")
    return None


def require_dali() -> None:
    """Raise ModuleNotFoundError naming the ``[dali-cuda12]``/``[dali-cuda13]`` extras when DALI is absent."""
    msg = dali_missing_message()
    if msg:
        raise ModuleNotFoundError(msg)


def _dali_seed(*parts: int) -> int:
    return derive_seed(*parts) % (2**31 - 1)  # DALI seeds are int32


def epoch_shard_order(shards: list[str], *, seed: int, epoch: int) -> list[str]:
    """The tar files in the order of this epoch: a permutation drawn from (seed, epoch), the same
    on every rank (DALI splits the concatenated samples of this list across ranks)."""
    order = list(shards)
    random.Random(derive_seed(seed, epoch, 4)).shuffle(order)
    return order


def _use_gpu(cfg: DataConfig, device: torch.device | str | None) -> bool:
    if cfg.dali_device == "cpu":
        return False
    if cfg.dali_device == "gpu":
        if not torch.cuda.is_available():
            raise ValueError("data.dali_device is 'gpu' but CUDA is not available; use 'cpu' or 'auto'")
        return True
    if device is not None:
        return torch.device(device).type == "cuda"
    return torch.cuda.is_available()


def _build_pipeline(
    cfg: DataConfig,
    shards: list[str],
    *,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    gpu: bool,
    device_id: int | None,
):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    s, p, P = cfg.scale, cfg.patch_size, cfg.hr_patch
    decode_device = "mixed" if gpu else "cpu"
    ordered = epoch_shard_order(shards, seed=seed, epoch=epoch)

    def augment(img, coin_h, coin_v, coin_t):
        img = fn.flip(img, horizontal=coin_h, vertical=coin_v)
        img = fn.cast(img, dtype=types.FLOAT)
        img = img + on_device(fn.cast(coin_t, dtype=types.FLOAT)) * (
            fn.transpose(img, perm=[1, 0, 2], transpose_layout=False) - img
        )
        return fn.transpose(img, perm=[2, 0, 1]) * (1.0 / 255.0)

    def coin(enabled: bool):
        return fn.random.coin_flip(probability=0.5 if enabled else 0.0, dtype=types.INT32)

    def on_device(node):
        # Per-sample scalars feed GPU arithmetic from the GPU; flip/slice take CPU arguments.
        return node.gpu() if gpu else node

    @pipeline_def(
        batch_size=cfg.batch_size,
        num_threads=cfg.dali_threads,
        device_id=device_id,
        seed=_dali_seed(seed, rank, epoch, 3),
        prefetch_queue_depth=cfg.dali_prefetch,
    )
    def pipe():
        ext = ["hr.png"] if cfg.hr_only else ["hr.png", "lr.png"]
        encoded = fn.readers.webdataset(
            paths=ordered,
            index_paths=[str(index_path(x)) for x in ordered],
            ext=ext,
            shard_id=rank,
            num_shards=world_size,
            stick_to_shard=True,  # past its part a rank wraps within it, never into the next rank's
            random_shuffle=True,
            initial_fill=cfg.shuffle_buffer,
            seed=_dali_seed(seed, rank, epoch, 5),
            missing_component_behavior="error",
            name="reader",
        )
        hr_enc = encoded[0] if isinstance(encoded, (list, tuple)) else encoded
        coin_h, coin_v, coin_t = coin(cfg.hflip), coin(cfg.vflip), coin(cfg.transpose)
        u = fn.random.uniform(range=[0.0, 1.0], shape=[2])
        if cfg.hr_only:
            hw = fn.cast(fn.slice(fn.peek_image_shape(hr_enc), 0, 2, axes=[0]), dtype=types.FLOAT)
            anchor = fn.cast(dmath.min(dmath.floor(u * (hw - P + 1.0)), hw - P), dtype=types.INT32)
            hr = fn.decoders.image(hr_enc, device=decode_device, output_type=types.RGB)
            hr = fn.slice(hr, anchor, [P, P], axis_names="HW", out_of_bounds_policy="error")
            return augment(hr, coin_h, coin_v, coin_t)
        lr_enc = encoded[1]
        hw = fn.cast(fn.slice(fn.peek_image_shape(lr_enc), 0, 2, axes=[0]), dtype=types.FLOAT)
        anchor = fn.cast(dmath.min(dmath.floor(u * (hw - p + 1.0)), hw - p), dtype=types.INT32)
        lr = fn.decoders.image(lr_enc, device=decode_device, output_type=types.RGB)
        hr = fn.decoders.image(hr_enc, device=decode_device, output_type=types.RGB)
        lr = fn.slice(lr, anchor, [p, p], axis_names="HW", out_of_bounds_policy="error")
        hr = fn.slice(hr, anchor * s, [p * s, p * s], axis_names="HW", out_of_bounds_policy="error")
        return augment(lr, coin_h, coin_v, coin_t), augment(hr, coin_h, coin_v, coin_t)

    pipeline = pipe()
    pipeline.build()
    return pipeline


def dali_reason(exc: BaseException) -> str:
    """DALI's error in one short phrase: the failing operator and what it encountered, without
    DALI's Python and C++ stack (``"fn.decoders.image: nvImageCodec failure: '#4'"``)."""
    text = str(exc)
    op = ""
    if "operator `" in text:
        op = text.split("operator `", 1)[1].split("`", 1)[0].replace("nvidia.dali.", "")
    reason = text.split("encountered:", 1)[1] if "encountered:" in text else text
    keep = []
    for ln in reason.splitlines():
        ln = ln.strip()
        if ln.startswith(("C++ context", "Current pipeline object", "Stacktrace", "Critical error")):
            if keep:
                break
            continue
        if ln:
            keep.append(ln)
    reason = " ".join(keep)[:300] or type(exc).__name__
    return f"{op}: {reason}" if op else reason


def find_damage(shards: list[str], budget_s: float = SCAN_BUDGET_S, *, scale: int | None = None,
                patch: int | None = None, hr_patch: int | None = None) -> list[str]:
    """What is wrong with ``shards``, one phrase per finding (after a DALI failure, which names
    no sample): a size that differs from the manifest, sample keys whose PNG members do not
    decode, where a shard's tar data stops being readable, and (given ``scale`` and ``patch``, the
    LR patch, for paired data; ``hr_patch`` for HR-only data) samples whose LR x scale is not the
    HR or that are smaller than the patch, which DALI cannot skip. Reads the shards once
    (decoding every PNG) until ``budget_s`` seconds have passed, then says how far it got."""
    found = [f"{sh}: {what}" for sh, what in verify_shards(shards, "size")]
    t0 = time.monotonic()
    for i, sh in enumerate(shards):
        if time.monotonic() - t0 > budget_s:
            found.append(f"scan stopped after {budget_s:g} s, {i} of {len(shards)} shards read")
            break
        bad: list[str] = []
        keys: set[str] = set()
        sizes: dict[str, dict[str, tuple[int, int]]] = {}
        last, error = None, ""
        try:
            with tarfile.open(sh, "r|") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    f = tar.extractfile(m)
                    data = f.read() if f is not None else b""
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"{m.name} has {len(data)} of its {m.size} bytes")
                    if m.name.endswith(".png"):
                        try:
                            decode_rgb(data, m.name)
                        except BadImageError:
                            bad.append(m.name)
                        key, _, ext = m.name.partition(".")
                        size = png_size(data[:24])
                        if ext in ("hr.png", "lr.png") and size is not None:
                            sizes.setdefault(key, {})[ext[:2]] = size
                    last = m.name
                    keys.add(m.name.split(".", 1)[0])
        except (tarfile.TarError, OSError, EOFError) as e:
            error = f" ({type(e).__name__}: {e})"
        expected = count_samples(sh)
        if error or len(keys) < expected:
            found.append(f"{sh}: tar data ends {f'after {last}' if last else 'at its start'}{error}, "
                         f"{len(keys)} of its {expected} samples readable")
        if bad:
            keys = sorted({b.split(".", 1)[0] for b in bad})
            found.append(f"{sh}: sample(s) {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} do not "
                         f"decode ({', '.join(bad[:3])})")
        found += [f"{sh}: {what}" for what in _size_problems(sizes, scale, patch, hr_patch)]
    return found


def _size_problems(sizes: dict[str, dict[str, tuple[int, int]]], scale: int | None, patch: int | None,
                   hr_patch: int | None) -> list[str]:
    """Samples DALI cannot crop: LR x scale != HR, or an image below the patch."""
    fix = "lower the patch size, or remove the image and remake the shards"
    out = []
    for key, sz in sorted(sizes.items()):
        lr, hr = sz.get("lr"), sz.get("hr")
        if hr_patch and hr and min(hr) < hr_patch:
            out.append(f"sample {key}: HR {hr[0]}x{hr[1]} is smaller than the HR patch {hr_patch} ({fix})")
        elif scale and lr and hr and (lr[0] * scale, lr[1] * scale) != hr:
            out.append(f"sample {key}: LR {lr[0]}x{lr[1]} x scale {scale} is not its HR {hr[0]}x{hr[1]}")
        elif patch and lr and min(lr) < patch:
            out.append(f"sample {key}: LR {lr[0]}x{lr[1]} is smaller than the patch {patch} ({fix})")
    return out


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) → a torch tensor on ``device`` (a copy)."""
    tensor = tl.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tensor.shape(), dtype=torch.float32, device=device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    import numpy as np

    return torch.from_numpy(np.array(tensor))


class DaliLoader:
    """Training batches from tar shards via a DALI pipeline (GPU or CPU-only).

    Yields ``{"lr": (B, 3, p, p), "hr": (B, 3, s·p, s·p)}`` float32 in [0, 1]: CUDA tensors
    with the GPU pipeline, CPU tensors with the CPU-only one.
    """

    def __init__(
        self,
        cfg: DataConfig,
        shards: list[str],
        counts: list[int],
        *,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device | str | None = None,
    ):
        require_dali()
        missing = [str(index_path(s)) for s in shards if not index_path(s).is_file()]
        if missing:
            raise ValueError(
                f"DALI needs an index next to every shard; missing {missing[:3]} (make_shards writes "
                "them, or run DALI's wds2idx)"
            )
        total = sum(counts)
        if total < world_size:
            raise ValueError(
                f"rank {rank} would get no data: {len(shards)} shard(s) hold {total} sample(s) for "
                f"{world_size} rank(s); DALI splits samples across ranks, one at least each"
            )
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self._order = {"batch_size": cfg.batch_size, "shuffle_buffer": cfg.shuffle_buffer,
                       "shards": shard_set(shards, counts)}  # what the resume check compares
        self.gpu = _use_gpu(cfg, device)
        if self.gpu:
            self.device = (
                torch.device(device)
                if device is not None
                else torch.device("cuda", torch.cuda.current_device())
            )
            if self.device.type != "cuda":
                raise ValueError(f"data.dali_device asks for the GPU but device={device!r} is not CUDA")
            self.device_id: int | None = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
        else:
            self.device, self.device_id = torch.device("cpu"), None
        self.state = LoaderState(seed, rank, world_size, epoch_batches(cfg, total, world_size))

    def __len__(self) -> int:
        return self.state.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def set_epoch(self, epoch: int) -> None:
        self.state.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict(**self._order, loader="dali")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state, **self._order)

    def _run(self, pipe: Any) -> Any:
        """``pipe.run()``; DALI's error (an undecodable image, unreadable tar data) becomes a
        ShardReadError naming DALI's operator and reason, the damage found in this rank's shards
        (:func:`find_damage`) and the fix."""
        try:
            return pipe.run()
        except Exception as e:  # DALI raises RuntimeError (and its own types) for data errors
            cfg = self.cfg
            sizes = {"hr_patch": cfg.hr_patch} if cfg.hr_only else {"scale": cfg.scale,
                                                                    "patch": cfg.patch_size}
            damage = find_damage(self.shards, **sizes)
            more = f" ... ({len(self.shards)} in all)" if len(self.shards) > 4 else ""
            shards = ", ".join(self.shards[:4]) + more
            if damage:
                found = "; found: " + "; ".join(damage[:6]) + (" ..." if len(damage) > 6 else "")
            else:
                found = f"; nothing found in shards {shards} (size vs manifest, tar data, PNG decode)"
            raise ShardReadError(
                f"DALI stopped at epoch {self.state.epoch}, batch {self.state.consumed} of this rank: "
                f"{dali_reason(e)}{found}. DALI cannot skip a bad sample and count it (exit status 6): "
                "re-run launch/make_shards.py for the damaged shards (data.verify_shards=sha256 finds "
                "changed bytes before start), or train with data.loader=webdataset, which skips bad "
                "samples and counts them against train.max_skip_rate"
            ) from e

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        st = self.state
        pipe = _build_pipeline(
            self.cfg,
            self.shards,
            rank=self.rank,
            world_size=self.world_size,
            seed=st.seed,
            epoch=st.epoch,
            gpu=self.gpu,
            device_id=self.device_id,
        )
        try:
            for _ in range(st.consumed):  # resume: replay and discard
                self._run(pipe)
            for _ in range(st.consumed, st.batches_per_epoch):
                outs = self._run(pipe)
                st.advance()
                if self.cfg.hr_only:
                    yield {"hr": _to_torch(outs[0], self.device)}
                else:
                    yield {"lr": _to_torch(outs[0], self.device), "hr": _to_torch(outs[1], self.device)}
        finally:
            del pipe
