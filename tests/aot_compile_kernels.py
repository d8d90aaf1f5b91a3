"""Compile the spsr_kernels Triton kernels for an sm_90 (H100) target down to cubin, without a GPU.

Helper of tests/test_kernels_aot.py (run as a script, not collected by pytest). It runs the real
launchers (``gradient_map_fwd/bwd``, ``info_nce_fwd/bwd``) on small CPU tensors with a fake
Triton driver that reports a ``cuda`` sm_90 target; ``JITFunction._do_compile`` is wrapped so
each launch compiles its kernel through Triton's normal pipeline (TTIR → TTGIR → LLIR → PTX →
cubin with the ptxas bundled in the triton wheel) and then returns without launching.

TRITON_INTERPRET must be unset *before* spsr_kernels is imported (it is read when the kernels
are decorated, and the launchers pick their GPU block configs only when it is off); the script
removes it itself.

Output on stdout, one record per line (other lines may appear and are ignored):

    AOT_KERNEL {"case", "kernel", "constexprs", "num_warps", "num_stages", "shared",
                "registers", "stack", "local"}   one per compiled kernel; shared in bytes
                from Triton's metadata; registers/stack/local from ``cuobjdump
                --dump-resource-usage`` (null when cuobjdump is unavailable)
    AOT_VARIANT {"case", "kernel", "key", "constexprs"}  --variants: one per launch, key = a hash
                                                  of the JIT's specialisation key; nothing compiled
    AOT_ERROR {"case", "type", "message"}         a launch/compile that raised
    AOT_SKIP <reason>                             the internals this relies on are missing;
                                                  exit status SKIP_EXIT (77)
    AOT_DONE {"compiled", "errors", "triton"}     last line of a completed run

Exit status: 0 when every case compiled, 1 when some raised, 77 for a skip.
Usage: ``python tests/aot_compile_kernels.py [--cap 90] [--sass] [--only NAME] [--variants]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable

# Must precede every import of triton/spsr_kernels: see the module docstring.
os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton

SKIP_EXIT = 77
# JITFunction._do_compile's parameters as of triton 3.8; the wrapper below passes them through.
EXPECTED_DO_COMPILE = ["self", "key", "signature", "device", "constexprs", "options", "attrs", "warmup"]


def _skip(reason: str) -> None:
    print(f"AOT_SKIP {reason}", flush=True)
    sys.exit(SKIP_EXIT)


def _emit(tag: str, record: dict) -> None:
    print(f"{tag} {json.dumps(record, sort_keys=True, default=str)}", flush=True)


def _check_hooks() -> tuple[type, str | None]:
    """Return (GPUTarget, cuobjdump path or None), or exit with AOT_SKIP naming what is missing."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        _skip(
            f"triton {triton.__version__}: internal module missing ({e}); the AOT harness needs "
            "triton.backends.compiler.GPUTarget, triton.runtime.driver, triton.runtime.jit.JITFunction"
        )
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        _skip(f"triton {triton.__version__}: no 'nvidia' backend in triton.backends.backends")
    if not callable(getattr(driver, "set_active", None)):
        _skip(
            f"triton {triton.__version__}: triton.runtime.driver has no set_active() to install a fake driver"
        )
    do_compile = getattr(JITFunction, "_do_compile", None)
    if do_compile is None:
        _skip(f"triton {triton.__version__}: JITFunction._do_compile does not exist")
    params = list(inspect.signature(do_compile).parameters)
    if params != EXPECTED_DO_COMPILE:
        _skip(
            f"triton {triton.__version__}: JITFunction._do_compile{tuple(params)} differs from the "
            f"expected {tuple(EXPECTED_DO_COMPILE)}"
        )
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except (ImportError, AttributeError, RuntimeError) as e:
        _skip(
            f"triton {triton.__version__}: no usable ptxas ({type(e).__name__}: {e}); the wheel's "
            "backends/nvidia/bin/ptxas or TRITON_PTXAS_PATH is needed to produce a cubin"
        )
    if not os.access(ptxas, os.X_OK):
        _skip(f"triton {triton.__version__}: ptxas at {ptxas} is not executable")
    try:
        cuobjdump = knobs.nvidia.cuobjdump.path
    except RuntimeError:
        cuobjdump = None  # resource usage is then reported as null; shared memory still comes from Triton
    return GPUTarget, cuobjdump


def _resource_usage(cubin: bytes, cuobjdump: str | None) -> dict[str, int | None]:
    usage: dict[str, int | None] = {"registers": None, "stack": None, "local": None}
    if cuobjdump is None:
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60
        ).stdout
    # "Resource usage: REG:52 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:616 ..." (one kernel per cubin)
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    for key, name in (("REG", "registers"), ("STACK", "stack"), ("LOCAL", "local")):
        if key in fields:
            usage[name] = int(fields[key])
    return usage


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _sass_stats(cubin: bytes, cuobjdump: str | None) -> dict[str, int | None]:
    """Counts from the SASS (``cuobjdump -sass``): instructions in all and in the main loop (the
    longest backward-branch range), global loads and how many are 128-bit vectors (LDG.E.128, or
    LDGSTS.E.BYPASS.128 cp.async copies), 128-bit stores, local-memory spill stores (STL)."""
    stats: dict[str, int | None] = dict.fromkeys(
        ("instr", "loop_instr", "ldg", "ldg128", "ldgsts", "ldgsts128", "stg128", "stl")
    )
    if cuobjdump is None:
        return stats
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, timeout=120).stdout
    instrs = [(int(m[1], 16), m[3], m[4]) for m in _SASS_LINE.finditer(out)]
    instrs = [i for i in instrs if i[1] != "NOP"]
    ops = [op for _, op, _ in instrs]
    loop = 0
    for addr, op, rest in instrs:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target[1], 16) < addr:
            loop = max(loop, sum(1 for a, _, _ in instrs if int(target[1], 16) <= a <= addr))
    stats.update(
        instr=len(ops),
        loop_instr=loop,
        ldg=sum(op.startswith("LDG.") for op in ops),
        ldg128=sum(op.startswith("LDG.") and op.endswith(".128") for op in ops),
        ldgsts=sum(op.startswith("LDGSTS") for op in ops),
        ldgsts128=sum(op.startswith("LDGSTS") and op.endswith(".128") for op in ops),
        stg128=sum(op.startswith("STG.") and op.endswith(".128") for op in ops),
        stl=sum(op.startswith("STL") for op in ops),
    )
    return stats


def _key_hash(key: object) -> str:
    """Short stable name of a JIT cache key (equal keys: one compiled kernel)."""
    return hashlib.sha256(str(key).encode()).hexdigest()[:16]


def _install(cap: int, sass: bool = False, keys_only: bool = False) -> list[dict]:
    """Install the fake driver and the compile-only _do_compile; return the list records go to.

    keys_only (--variants): record each launch's specialisation key (AOT_VARIANT) and compile nothing.
    """
    GPUTarget, cuobjdump = _check_hooks()
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class FakeDriver:
        """Just enough of a CUDA driver for JITFunction.run to reach _do_compile."""

        def get_current_target(self):
            return GPUTarget("cuda", cap, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(FakeDriver())
    records: list[dict] = []
    original = JITFunction._do_compile

    def compile_only(self, key, signature, device, constexprs, options, attrs, warmup):
        if keys_only:
            record = {
                "case": _CURRENT_CASE[0],
                "kernel": self.fn.__name__,
                "key": _key_hash(key),
                "constexprs": {self.arg_names[k[0]]: v for k, v in constexprs.items()},
            }
            records.append(record)
            _emit("AOT_VARIANT", record)
            return None
        kernel = original(self, key, signature, device, constexprs, options, attrs, True)
        if hasattr(kernel, "result"):  # async compile mode returns a future
            kernel = kernel.result()
        # Forget it, so a second launch with the same key recompiles instead of trying to launch.
        self.device_caches[device][0].pop(key, None)
        record = {
            "case": _CURRENT_CASE[0],
            "kernel": self.fn.__name__,
            # The JIT's cache key (argument specialisations, constexprs, options): launches with
            # equal keys share one compiled kernel.
            "spec_key": _key_hash(key),
            "constexprs": {self.arg_names[k[0]]: v for k, v in constexprs.items()},
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
            "shared": kernel.metadata.shared,
            **_resource_usage(kernel.asm["cubin"], cuobjdump),
            **(_sass_stats(kernel.asm["cubin"], cuobjdump) if sass else {}),
        }
        records.append(record)
        _emit("AOT_KERNEL", record)
        return None  # JITFunction.run returns before launching when _do_compile gives None

    JITFunction._do_compile = compile_only
    return records


_CURRENT_CASE = [""]


def _cases() -> list[tuple[str, Callable[[], None]]]:
    """The reduced set of launcher calls; each compiles one kernel per launch."""
    from triton.runtime.jit import JITFunction

    # import_module: the package re-exports functions under the submodules' names.
    gm = importlib.import_module("spsr_kernels.gradient_map")
    nce = importlib.import_module("spsr_kernels.info_nce")

    if not isinstance(gm._gradient_map_fwd_kernel, JITFunction):
        raise RuntimeError(
            f"spsr_kernels was imported in interpreter mode ({type(gm._gradient_map_fwd_kernel).__name__}); "
            "TRITON_INTERPRET must be unset before the import"
        )
    if not hasattr(gm._gradient_map_fwd_kernel, "device_caches"):
        _skip(
            f"triton {triton.__version__}: JITFunction instances have no device_caches (per-device kernel "
            "cache) for the harness to clear after each compile"
        )
    cases: list[tuple[str, Callable[[], None]]] = []

    def gm_case(dtype: torch.dtype, padding: int, layout: str, w: int) -> Callable[[], None]:
        def run() -> None:
            if layout == "strided":  # every other column: the general path (runtime strides)
                x = torch.zeros(2, 3, 40, 2 * w, dtype=dtype)[..., ::2]
            else:
                x = torch.zeros(2, 3, 40, w, dtype=dtype)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            m = gm.gradient_map_fwd(x, padding)  # the launch returns m, unwritten
            gm.gradient_map_bwd(x, torch.zeros_like(m), padding)  # dL/dM in M's layout, as autograd gives

        return run

    # W = 128 (training crops; rows 16-byte aligned), W = 100 (not a multiple of 16: fp32 rows
    # still 16-byte aligned, bf16 rows 8-byte aligned), W = 77 (rows unaligned: no vector loads),
    # and a strided view (the general path).
    gm_groups = [(128, ("contiguous", "channels_last")), (100, ("contiguous", "channels_last"))]
    gm_groups += [(77, ("contiguous",)), (128, ("strided",))]
    for w, layouts in gm_groups:
        for dtype in (torch.float32, torch.bfloat16):
            for padding in (1, 2):
                for layout in layouts:
                    suffix = "" if w == 128 else f" W={w}"
                    name = f"gradient_map {dtype} padding={padding} {layout}{suffix}"
                    cases.append((name, gm_case(dtype, padding, layout, w)))

    def nce_case(dtype: torch.dtype, d: int, exclusion: bool) -> Callable[[], None]:
        def run() -> None:
            B, H, W, N = 2, 12, 10, 50
            M = H * W
            # Rows padded as InfoNCEFunction pads them (d=24 -> 32): the shipped configuration.
            p = nce._pad_rows(torch.randn(B, N, d).to(dtype))
            k = nce._pad_rows(torch.randn(B, M, d).to(dtype))
            pos = torch.randint(0, M, (B, N))
            crow = ccol = None
            radius = 0
            if exclusion:
                crow, ccol = nce._centre_grid(torch.randint(0, M, (B, N, 4)), W)
                radius = 3
            lse, _ = nce.info_nce_fwd(p, k, pos, crow, ccol, 64.0, W, radius)
            nce.info_nce_bwd(
                p, k, pos, crow, ccol, lse, torch.ones(B, N), torch.ones(B, N), torch.ones(B, M),
                64.0, W, radius,
            )  # fmt: skip

        return run

    for dtype in (torch.float32, torch.bfloat16):
        for exclusion in (False, True):
            cases.append((f"info_nce {dtype} d=32 exclusion={exclusion}", nce_case(dtype, 32, exclusion)))
    # The widest rows each dtype ships (MAX_KERNEL_DIM), d not a multiple of 16 (rows padded),
    # and fp16 (fp32 gradient operands, unlike bf16).
    wide = [(torch.float32, 64), (torch.float32, 128), (torch.bfloat16, 24), (torch.bfloat16, 128)]
    wide += [(torch.bfloat16, 256)]
    wide += [(torch.bfloat16, 512), (torch.float16, 32), (torch.float16, 128), (torch.float16, 512)]
    for dtype, d in wide:
        cases.append((f"info_nce {dtype} d={d} exclusion=True", nce_case(dtype, d, True)))

    def nce_size_case(N: int, H: int, W: int) -> Callable[[], None]:
        def run() -> None:
            M = H * W
            p = nce._pad_rows(torch.randn(1, N, 32).to(torch.bfloat16))
            k = nce._pad_rows(torch.randn(1, M, 32).to(torch.bfloat16))
            pos = torch.randint(0, M, (1, N))
            crow, ccol = nce._centre_grid(torch.randint(0, M, (1, N, 3)), W)
            lse, _ = nce.info_nce_fwd(p, k, pos, crow, ccol, 64.0, W, 4)
            nce.info_nce_bwd(
                p, k, pos, crow, ccol, lse, torch.ones(1, N), torch.ones(1, N), torch.ones(1, M),
                64.0, W, 4,
            )  # fmt: skip

        return run

    def words_case(C: int) -> Callable[[], None]:
        def run() -> None:
            pos = torch.randint(0, 120, (1, 50))
            crow, ccol = nce._centre_grid(torch.randint(0, 120, (1, 50, C)), 10)
            nce.exclusion_words(pos, crow, ccol, 120, 10, 4)

        return run

    # The bitmap pre-pass unrolls one test per centre: register use varies with C.
    for C in (1, 2, 3, 5, 8):
        cases.append((f"info_nce exclusion bitmap C={C}", words_case(C)))
    # Sizes that differ in every specialisation class (1, multiples of 16, others): one kernel.
    for N, H, W in ((50, 12, 10), (64, 16, 16), (1, 1, 1), (100, 9, 48)):
        cases.append((f"info_nce sizes N={N} H={H} W={W}", nce_size_case(N, H, W)))
    return cases


def _gradient_map_variant_cases() -> list[tuple[str, Callable[[], None]]]:
    """--variants: the gradient-map launchers over image sizes of three alignment classes of rows:
    16-byte (W = 128, 64, 96; W = 100 and 36 in fp32), 8-byte (W = 100 and 36 in bf16), unaligned
    (W = 77, 53), with heights of several divisibilities."""
    gm = importlib.import_module("spsr_kernels.gradient_map")

    def case(dtype: torch.dtype, padding: int, layout: str, h: int, w: int) -> Callable[[], None]:
        def run() -> None:
            x = torch.zeros(2, 3, h, w, dtype=dtype)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            m = gm.gradient_map_fwd(x, padding)
            gm.gradient_map_bwd(x, torch.zeros_like(m), padding)

        return run

    sizes = [(40, 128), (64, 64), (33, 96), (41, 100), (48, 100), (27, 36), (37, 77), (64, 77), (29, 53)]
    return [
        (f"gradient_map {dtype} padding={padding} {layout} {h}x{w}", case(dtype, padding, layout, h, w))
        for dtype in (torch.float32, torch.bfloat16)
        for padding in (1, 2)
        for layout in ("contiguous", "channels_last")
        for h, w in sizes
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=90, help="compute capability to target (90: H100)")
    parser.add_argument("--only", default="", help="compile only the cases whose name contains this")
    parser.add_argument("--sass", action="store_true", help="add SASS counts (loads, loop) to each record")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="record the specialisation keys of gradient-map launches over image sizes; compile nothing",
    )
    args = parser.parse_args(argv)
    records = _install(args.cap, sass=args.sass, keys_only=args.variants)
    errors = 0
    for name, run in _gradient_map_variant_cases() if args.variants else _cases():
        if args.only not in name:
            continue
        _CURRENT_CASE[0] = name
        try:
            run()
        except Exception as e:  # every failure is reported and the remaining cases still run
            errors += 1
            traceback.print_exc()
            _emit("AOT_ERROR", {"case": name, "type": type(e).__name__, "message": str(e)[-4000:]})
    _emit("AOT_DONE", {"compiled": len(records), "errors": errors, "triton": triton.__version__})
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
