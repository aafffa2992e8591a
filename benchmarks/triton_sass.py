"""Machine code of the Triton scan kernels for an NVIDIA GPU, read without a GPU.

Both kernels are bound by the instructions they issue per state element, not by the exp unit
(docs/benchmarks/triton.md), and device time is scarce. This script builds the kernels exactly as a launch at
the given shape would: the same constexprs and tiles, and the JIT's specialisation of the other arguments
(divisible by 16, or equal to 1, which makes a stride a constant). It compiles them with Triton's bundled
ptxas for an sm_XX target, then reports registers, spills, shared memory, resident warps per SM and the SASS
instruction mix. A kernel change should show fewer instructions (or registers) here before it is timed on
a card.

    python benchmarks/triton_sass.py                                # the paper's shape, bf16, sm_90
    python benchmarks/triton_sass.py --set BACKWARD_BLOCK_N=16      # a tile the device sweep would try
    python benchmarks/triton_sass.py --deterministic --out sass.json --sass-dir sass/

Needs TRITON_INTERPRET unset. The inputs are uninitialised and nothing runs, so the paper's shape costs only
the backward's zero-filled atomic outputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from arcee_scan import triton_scan  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
REGISTERS_PER_SM, MAX_WARPS_PER_SM = 65536, 64  # sm_80 and sm_90
LAUNCH_OPTIONS = ("num_warps", "maxnreg")  # keyword arguments of a launch that are not kernel arguments


class _CapturedLaunch:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, grid, args, kwargs))


def placeholder_inputs(shape: tuple[int, int, int, int], dtype: torch.dtype) -> dict:
    """Uninitialised inputs in bench_scan.py's channels-first layout (time-major B/C, every option on)."""
    batch, dim, length, d_state = shape

    def empty(*size, dtype=dtype):
        return torch.empty(*size, dtype=dtype)

    return {
        "u": empty(batch, dim, length),
        "delta": empty(batch, dim, length),
        "A": empty(dim, d_state, dtype=torch.float32),
        "B": empty(batch, length, d_state).transpose(1, 2)[:, None],  # (b, G=1, N, L)
        "C": empty(batch, length, d_state).transpose(1, 2)[:, None],
        "D": empty(dim, dtype=torch.float32),
        "z": empty(batch, dim, length),
        "delta_bias": empty(dim, dtype=torch.float32),
        "delta_softplus": True,
        "initial_state": empty(batch, dim, d_state, dtype=torch.float32),
    }


def capture_launches(shape, dtype: torch.dtype, chunk_size: int, deterministic: bool) -> list:
    """The forward's and the backward's kernel launches at ``shape``, captured, not run."""
    x = placeholder_inputs(shape, dtype)
    launches: list = []
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(triton_scan, "_check_input", lambda u: None))
        for name in ("_scan_fwd_kernel", "_scan_bwd_kernel"):
            kernel = getattr(triton_scan, name)
            stack.enter_context(mock.patch.object(triton_scan, name, _CapturedLaunch(kernel, launches)))
        args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")]
        out, h_T, checkpoints, y_pregate = triton_scan.scan_forward(*args, x["initial_state"], chunk_size)
        triton_scan.scan_backward(
            torch.empty_like(out), torch.empty_like(h_T), *args, x["initial_state"], checkpoints, y_pregate,
            chunk_size, deterministic,
        )  # fmt: skip
    return launches[:2]  # the backward launches once per slice of samples; all are the same code


def compile_launch(kernel, args: tuple, kwargs: dict, arch: int):
    """Compile ``kernel`` for sm_``arch`` with the specialisation Triton's JIT gives these arguments."""
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # the caching allocator aligns to 256 bytes
        elif isinstance(value, bool):
            signature[name], constexprs[name] = "constexpr", value
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    options = {name: kwargs[name] for name in LAUNCH_OPTIONS if kwargs.get(name) is not None}
    for name, value in kwargs.items():
        if name not in LAUNCH_OPTIONS:
            signature[name], constexprs[name] = "constexpr", value
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run(
            [str(TOOLS / "cuobjdump"), flag, str(path)], capture_output=True, text=True, check=True
        ).stdout


def innermost_loop(sass: str) -> list[str]:
    """Opcodes of the shortest loop body: from a backward branch's target to the branch."""
    listing = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", sass)
    addresses = [int(address, 16) for address, _, _ in listing]
    bodies = []
    for end, (_, opcode, operands) in enumerate(listing):
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        target_address = int(target.group(1), 16) if target else None
        if target_address is not None and target_address < addresses[end] and target_address in addresses:
            start = addresses.index(target_address)
            bodies.append([op for _, op, _ in listing[start : end + 1]])
    return min(bodies, key=len, default=[])


def report(compiled, grid, kwargs: dict) -> dict:
    sass = _cuobjdump(compiled.asm["cubin"], "-sass")
    usage = _cuobjdump(compiled.asm["cubin"], "-res-usage")
    resources = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    registers, num_warps = int(resources["REG"]), kwargs.get("num_warps", 4)
    # one iteration of the innermost loop (a step of the forward, a chunk of the backward) updates the
    # whole tile, the product of the BLOCK_* sizes, spread over the program's threads
    tile = math.prod(value for name, value in kwargs.items() if name.startswith("BLOCK_"))
    loop = innermost_loop(sass)
    # registers are allocated per warp in units of 256
    per_warp = math.ceil(registers * 32 / 256) * 256
    warps_per_sm = min(MAX_WARPS_PER_SM, REGISTERS_PER_SM // per_warp // num_warps * num_warps)
    return {
        "grid": list(grid),
        "constexprs": {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS},
        "num_warps": num_warps,
        "max_registers": kwargs.get("maxnreg"),
        "registers": registers,
        "spill_bytes": int(resources["STACK"]) + int(resources["LOCAL"]),  # no calls: the stack is spills
        "shared_bytes": int(resources["SHARED"]),
        "warps_per_sm": warps_per_sm,
        "instructions": len(opcodes),
        "mix": dict(Counter(opcodes).most_common()),
        "loop_instructions": len(loop),
        "loop_mix": dict(Counter(loop).most_common()),
        "loop_instructions_per_state_element": round(len(loop) * 32 * num_warps / tile, 2),
        "sass": sass,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="48,1536,256,256", help="batch,dim,L,N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--deterministic", action="store_true", help="the backward without atomics")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="NAME=INT", help="override triton_scan's tile constants"
    )
    parser.add_argument("--top", type=int, default=14, help="loop opcodes printed per kernel")
    parser.add_argument("--out", type=Path, help="write the report (without SASS) as JSON here")
    parser.add_argument("--sass-dir", type=Path, help="write each kernel's SASS listing here")
    args = parser.parse_args()

    for item in args.set:
        name, _, value = item.partition("=")
        if not hasattr(triton_scan, name) or not value.lstrip("-").isdigit():
            parser.error(f"--set expects NAME=INT with NAME a constant of triton_scan, got {item!r}")
        setattr(triton_scan, name, int(value))
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        parser.error(f"--shape expects batch,dim,L,N, got {args.shape!r}")

    results = {}
    for kernel, grid, launch_args, kwargs in capture_launches(
        shape, DTYPES[args.dtype], args.chunk_size, args.deterministic
    ):
        name = kernel.__name__.strip("_")
        results[name] = report(compile_launch(kernel, launch_args, kwargs, args.arch), grid, kwargs)
        r = results[name]
        print(
            f"{name}: grid {tuple(r['grid'])}, {r['num_warps']} warp(s), {r['constexprs']}\n"
            f"  {r['registers']} registers, {r['spill_bytes']} B spilled, {r['shared_bytes']} B shared, "
            f"{r['warps_per_sm']} warps/SM; {r['instructions']} SASS instructions, "
            f"{r['loop_instructions']} in the innermost loop "
            f"({r['loop_instructions_per_state_element']} per state element):\n"
            f"  {', '.join(f'{op} {n}' for op, n in list(r['loop_mix'].items())[: args.top])}"
        )
        if args.sass_dir:
            args.sass_dir.mkdir(parents=True, exist_ok=True)
            (args.sass_dir / f"{name}.sass").write_text(r["sass"])
    if args.out:
        meta = {"shape": shape, "dtype": args.dtype, "chunk_size": args.chunk_size, "arch": args.arch}
        meta |= {"deterministic": args.deterministic, "set": args.set, "triton": triton.__version__}
        kernels = {name: {k: v for k, v in r.items() if k != "sass"} for name, r in results.items()}
        args.out.write_text(json.dumps({**meta, "kernels": kernels}, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
