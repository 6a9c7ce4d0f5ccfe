"""Sweeps the CUDA loss kernel's chunk size (PID_FAST_CUDA_ITERS vector iterations per thread)
for the single pass that reads n, F(t), F(t2), G and writes both gradient directions; device
time from CUDA-graph replays over 4 rotating input sets. GPU only:
    python benchmarks/sweep_cuda_chunk.py [out.json]
"""

import json
import os
import sys

import torch

import pid_fast  # noqa: F401
from pid_fast.ops.testing import make_case


def time_ms(fn, reps=50):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def main(out=None):
    if not torch.cuda.is_available():
        print("sweep_cuda_chunk: needs a CUDA GPU; nothing measured")
        return
    rows = []
    for shape in [(512, 3, 32, 32), (256, 3, 64, 64)]:
        cases = [make_case(shape, torch.float32, "cuda", seed=k) for k in range(4)]
        for iters in (1, 2, 4, 8):
            os.environ["PID_FAST_CUDA_ITERS"] = str(iters)

            def all_sets():
                for c in cases:
                    torch.ops.pid_fast.loss(*c.streams(), c.t, c.t2, None, None, None, None,
                                            c.c_skip, c.c_out, None, 80.0, 0, 0.0, True)

            ms = time_ms(all_sets) / len(cases)
            nbytes = 6 * cases[0].f_t.numel() * 4
            rows.append(dict(device=torch.cuda.get_device_name(), shape=list(shape),
                             iters=iters, ms=ms, GBps=nbytes / ms / 1e6))
            print(f"{'x'.join(map(str, shape))} iters={iters}: {ms * 1e3:.1f} us, "
                  f"{nbytes / ms / 1e6:.0f} GB/s")
    if out:
        json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
