"""Compiles the Triton scan kernels for NVIDIA targets without a GPU (Triton's bundled ptxas).

Catches what the interpreter cannot: code that only fails when lowered for a real device (non-constexpr
globals, unsupported layouts, tuple scans, flips of 3-D tiles). Run as a script, with TRITON_INTERPRET unset:
    python tests/arcee_scan/compile_triton_kernels.py 80 90
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from arcee_scan import triton_scan  # noqa: E402

# pointers to (batch, dim, L) / B / C tensors carry the input dtype; everything else is fp32
INPUT_POINTERS = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "out_ptr", "dz_ptr"}
OPTIONS = ("HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "HAS_H0", "HAS_DOUT", "HAS_DHT")


def compile_kernel(kernel, constexprs: dict, arch: int, input_dtype: str, num_warps: int) -> None:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = input_dtype if name in INPUT_POINTERS else "*fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(kernel, signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def main(archs: list[int]) -> None:
    variants = [
        # (all options on or off, input dtype, atomics, reverse scan by flip (the forward's grid order follows
        # it, the backward's the other), forward / backward tiles)
        (True, "*bf16", True, True, (4, 256), (4, 16, 16)),
        (True, "*fp16", False, False, (32, 16), (8, 16, 8)),
        (False, "*fp32", True, False, (4, 256), (4, 16, 16)),
        (False, "*fp32", False, True, (1, 1), (1, 1, 1)),  # N = 1, chunk_size = 1
    ]
    for arch in archs:
        for enabled, dtype, atomic, flip, (fwd_d, fwd_n), (bwd_d, bwd_n, bwd_t) in variants:
            flags = dict.fromkeys(OPTIONS, enabled)
            forward = {k: flags[k] for k in ("HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "HAS_H0")}
            forward |= {"CHANNELS_FIRST": flip, "BLOCK_D": fwd_d, "BLOCK_N": fwd_n}
            compile_kernel(triton_scan._scan_fwd_kernel, forward, arch, dtype, 4)
            backward = {**flags, "ATOMIC_BC": atomic, "ATOMIC_DU": atomic, "USE_FLIP": flip}
            backward["CHANNELS_FIRST"] = not flip
            backward |= {"BLOCK_D": bwd_d, "BLOCK_N": bwd_n, "BLOCK_T": bwd_t}
            compile_kernel(triton_scan._scan_bwd_kernel, backward, arch, dtype, 8)
            print(f"sm_{arch} options={'on' if enabled else 'off'} {dtype} atomic={atomic} flip={flip}: ok")


if __name__ == "__main__":
    main([int(arch) for arch in sys.argv[1:]] or [90])
