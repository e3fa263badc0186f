"""Every CPU matmul kernel moeserve can pick, timed on this machine (the evidence behind
moeserve/layers/linear.py's choices).

    python scripts/bench_linear_kernels.py [--shape 4096x1024] [--rows 1,4,16,64,256,512] [--cold 24]

For a weight [out, in] and each row count: float32 F.linear and oneDNN; bf16 F.linear and a
oneDNN weight reordered once; int8 dynamic (activations quantized per call) with fbgemm's and
oneDNN's kernels; weight-only int8 (_weight_int8pack_mm, bf16 activations); moeserve's native
bf16 and int8 kernels (bf16 activations, weights on huge pages) where they build. Median ms of
--iters calls after a warm-up; a kernel this torch build or CPU lacks prints "-".
--cold N cycles through N copies of the weight so that, N x its size past the last-level cache,
every call streams its weight from DRAM as a serving step does.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from moeserve.cpu_features import cpu_flags, cpu_has_amx_int8, cpu_has_fast_bf16, cpu_has_vnni
from moeserve.kernels import native
from moeserve.layers.linear import (Int8Weight, NativeBF16Weight, NativeInt8Weight, OneDNNBF16Weight, WeightFormat,
                                    quantize_per_channel)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x1024", help="OUTxIN of the weight")
    p.add_argument("--rows", default="1,2,4,8,16,32,64,128,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--cold", type=int, default=1, help="copies of the weight to cycle through")
    return p.parse_args()


def median_ms(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernels(weight: torch.Tensor) -> dict:
    """name -> callable(x float32) for every kernel that builds here."""
    w16 = weight.bfloat16()
    found = {"f32 F.linear": lambda x: F.linear(x, weight)}
    if torch.backends.mkldnn.is_available():
        found["f32 oneDNN"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    found["bf16 F.linear"] = lambda x: F.linear(x.bfloat16(), w16)
    try:
        packed16 = OneDNNBF16Weight(weight)
        found["bf16 oneDNN packed"] = lambda x: packed16(x.bfloat16())
    except RuntimeError:
        pass
    engines = torch.backends.quantized.supported_engines
    for fmt, engine in ((WeightFormat.INT8_FBGEMM, "fbgemm"), (WeightFormat.INT8_ONEDNN, "onednn")):
        if engine in engines:
            found[f"int8 {engine}"] = Int8Weight(weight, fmt)
    q, scale = quantize_per_channel(weight)
    found["int8 weight-only (bf16 x)"] = lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale.bfloat16())
    if native.library() is not None:
        native16, native8 = NativeBF16Weight(weight), NativeInt8Weight(weight)
        found["bf16 native"] = lambda x: native16(x.bfloat16())
        found["int8 native (bf16 x)"] = lambda x: native8(x.bfloat16())
    return found


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    out_f, in_f = (int(v) for v in args.shape.split("x"))
    copies = [kernels(torch.randn(out_f, in_f) * 0.02) for _ in range(max(1, args.cold))]
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, fast bf16 {cpu_has_fast_bf16()}, "
          f"AMX-INT8 {cpu_has_amx_int8()}, VNNI {cpu_has_vnni()}, {len(cpu_flags())} flags; "
          f"{args.threads} threads; weight {out_f}x{in_f}{f' x {len(copies)} copies' if len(copies) > 1 else ''}; "
          f"median ms")
    names = list(copies[0])
    print("| rows | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, in_f)
        cells = []
        for name in names:
            turn = itertools.cycle(copies)
            call = (lambda: next(turn)[name](x))                          # the next copy each call
            try:
                cells.append(f"{median_ms(call, args.iters):.3f}")
            except RuntimeError:
                cells.append("-")
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
