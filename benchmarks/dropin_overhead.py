"""The drop-in loss inside other trainers (issue #25): measured numbers for benchmarks/results/dropin.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dropin_overhead.py [--steps 40] [--out benchmarks/results/dropin.md]

1. DDP gradients on 2 gloo CPU processes (global batch 8, fixed grid indices, tiny DDPM++ 8x8):
   rank vs rank and rank vs one process on the whole batch (relative L2), for DDP of the raw
   network, DDP of an EDM-shaped EDMPrecond called through, and the ``ddp.module.model`` bypass.
2. The EDM-shaped stand-in loop (tests/integrations/edm_standin.py: EDM's calls, not its code) with
   EDMPIDLoss on 2 processes: per-step loss, the loss on a fixed probe batch before/after, and the
   snapshot round trip (convert -> weights, one-step samples from the .pkl and the converted file
   against the network in memory; the pickled loss_fn's size, and its loss after unpickling).
3. CPU cost of calling through the wrapper against the raw path (one process, one thread, batch 16):
   CPU time (process_time: less disturbed by other processes than wall time) and wall time per
   loss + backward, and the loss/gradient difference, each also against an fp64 reference.
"""

import argparse
import copy
import os
import pickle
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integrations"))
import edm_standin as standin  # noqa: E402  (the stand-in loop and EDM-shaped EDMPrecond)

from pid_fast.loss import PIDLoss  # noqa: E402
from pid_fast.models.preconditioning import EDMPrecond  # noqa: E402


def fmt(x):
    return f"{x:.3g}"


class EDM64(EDMPrecond):
    """The teacher in float64 (the reference)."""

    def model_dtype(self, device, force_fp32=False):
        return torch.float64

    def raw(self, x_in, c_noise, class_labels=None, force_fp32=False):
        return self.model(x_in.double(), c_noise.double(), class_labels)


def cost_numbers(repeats):
    """Time per loss+backward and differences: raw network, EDMPrecond (pid_fast's and EDM's
    interface), DDP(EDMPrecond) in a 1-process group."""
    torch.set_num_threads(1)
    edm, _ = standin.make_network(seed=0)
    teacher = EDMPrecond(copy.deepcopy(edm.model)).eval()
    noise = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 80
    indices = torch.linspace(0, 249, 16).round().long()
    pid = PIDLoss(teacher)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(standin.free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    students = {
        "raw network F": lambda: (copy.deepcopy(edm.model).train(),) * 2,
        "DDP(raw F)": lambda: _ddp(copy.deepcopy(edm.model).train()),
        "EDM-shaped EDMPrecond": lambda: _pre(standin.EDMPrecond(copy.deepcopy(edm.model), 8, 3).train()),
        "DDP(EDM-shaped EDMPrecond)": lambda: _ddp_pre(standin.EDMPrecond(copy.deepcopy(edm.model), 8, 3).train()),
    }
    # fp64 reference: the raw path with network and teacher in float64
    net64 = copy.deepcopy(edm.model).double().train()
    ref = PIDLoss(EDM64(copy.deepcopy(edm.model).double()), backend="reference")(net64, noise.double(), indices=indices)
    ref.backward()
    ref_grad = standin.flat_grad(net64)
    built = {name: make() for name, make in students.items()}
    times = {name: [] for name in built}
    cpu_times = {name: [] for name in built}
    last = {}
    for _ in range(repeats):  # round-robin: a busy machine slows every variant alike
        for name, (call, params) in built.items():
            for p in params.parameters():
                p.grad = None
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = pid(call, noise, indices=indices)
            loss.backward()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            last[name] = loss.detach()
    rows, results = [], {}
    for name, (call, params) in built.items():
        grad = standin.flat_grad(params)
        results[name] = (last[name], grad)
        rows.append((name, np.median(cpu_times[name]) * 1e3, np.min(cpu_times[name]) * 1e3,
                     np.median(times[name]) * 1e3, last[name].item(), grad))
    dist.destroy_process_group()
    base_loss, base_grad = results["raw network F"]
    lines = ["| student as called | CPU ms per loss+backward, median (min) | wall ms, median | loss rel. diff vs raw | "
             "grad rel. diff vs raw | loss rel. err vs fp64 | grad rel. err vs fp64 |", "|---|---|---|---|---|---|---|"]
    for name, ms, ms_min, wall, loss, grad in rows:
        lines.append(f"| {name} | {ms:.1f} ({ms_min:.1f}) | {wall:.1f} | {fmt(abs(loss - float(base_loss)) / float(base_loss))} | "
                     f"{fmt(standin.relative(grad, base_grad))} | {fmt(abs(loss - float(ref)) / float(ref))} | "
                     f"{fmt(standin.relative(grad.double(), ref_grad))} |")
    return lines


def _ddp(module):
    return torch.nn.parallel.DistributedDataParallel(module), module


def _pre(module):
    return module, module.model


def _ddp_pre(module):
    return torch.nn.parallel.DistributedDataParallel(module), module.model


def loop_numbers(steps):
    from click.testing import CliRunner
    from edm_fakes import hostile_source, sha256

    from pid_fast.cli import main
    from pid_fast.io import edm_sources, load_teacher

    tmp = tempfile.mkdtemp(prefix="dropin-")
    marker = os.path.join(tmp, "executed.txt")
    edm_sources.KNOWN_EDM_SOURCES[sha256(hostile_source(marker))] = "benchmark: stand-in snapshots"
    teacher_path = standin.teacher_file(tmp, marker)
    loop = dict(standin.LOOP, steps=steps)
    start = time.perf_counter()
    mp.spawn(standin.dropin_worker, nprocs=2, join=True,
             args=(2, standin.free_port(), tmp, teacher_path, marker, (steps,), loop))
    wall = time.perf_counter() - start
    ranks = [torch.load(os.path.join(tmp, f"grads-rank{r}.pt")) for r in range(2)]
    single = standin.rank_gradients(0, 1)
    grad_lines = ["| student | rank 0 vs rank 1 | rank 0 vs one process, whole batch |", "|---|---|---|"]
    for kind, what in (("raw", "DDP(raw F)"), ("preconditioned", "DDP(EDM-shaped EDMPrecond), called through"),
                       ("fsdp", "FSDP(EDM-shaped EDMPrecond), NO_SHARD, called through"),
                       ("bypass", "DDP(EDMPrecond), loss on ddp.module.model (hooks bypassed)")):
        grad_lines.append(f"| {what} | {fmt(standin.relative(ranks[0][kind], ranks[1][kind]))} | "
                          f"{fmt(standin.relative(ranks[0][kind], single[kind]))} |")

    result = torch.load(os.path.join(tmp, "loop-result.pt"))
    losses, (snapshot,) = result["losses"], result["snapshots"]
    teacher = load_teacher(teacher_path)
    probe = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(123)) * 80
    probe_idx = torch.linspace(0, 249, 64).round().long()
    initial, _ = standin.make_network(seed=0)
    trained, _ = standin.make_network(seed=0)
    trained.model.load_state_dict(result["ema"])
    with torch.no_grad():
        before = float(PIDLoss(teacher)(initial.model.eval(), probe, indices=probe_idx))
        after = float(PIDLoss(teacher)(trained.model.eval(), probe, indices=probe_idx))
    means = [float(np.mean(losses[i:i + 5])) for i in range(0, len(losses), 5)]

    converted = os.path.join(tmp, "student.safetensors")
    conv = CliRunner().invoke(main, ["convert", snapshot, converted])
    from pid_fast.io import load_checkpoint
    state, _ = load_checkpoint(converted)
    weight_diff = max(float((state[k] - result["ema"][k]).abs().max()) for k in state)
    from pid_fast.sampling import seeded_latents
    z, _ = seeded_latents(list(range(16)), (3, 8, 8), 0)
    t, T, sd = 0.002, 80.0, 0.5
    with torch.no_grad():
        F = trained.model(T * z / (sd ** 2 + T ** 2) ** 0.5, torch.full((16,), np.log(t) / 4), None)
    expected = ((t / T) * T * z + (1 - t / T) * F).clamp(-1, 1)
    sample_diffs = []
    for source in (snapshot, converted):
        out = os.path.join(tmp, os.path.basename(source) + ".npz")
        run = CliRunner().invoke(main, ["sample", source, out, "--num", "16", "--batch", "16", "--device", "cpu"])
        assert run.exit_code == 0, run.output
        sample_diffs.append(float((torch.from_numpy(np.load(out)["x"]) - expected).abs().max()))

    from pid_fast.integrations.edm import EDMPIDLoss
    loss_fn = EDMPIDLoss(teacher=teacher_path)
    blob = pickle.dumps(loss_fn)
    images = torch.zeros(8, 3, 8, 8)
    torch.manual_seed(0)
    a = loss_fn(net=initial.eval(), images=images)
    torch.manual_seed(0)
    b = pickle.loads(blob)(net=initial, images=images)
    a, b = a.detach(), b.detach()
    lines = [
        f"2 gloo processes, global batch {loop['batch_size']}, Adam lr {loop['lr']}, "
        f"{steps} steps, tiny DDPM++ 8x8 student initialised from the teacher (EDM's --transfer); "
        f"wall time of the 2-process run (gradient check + loop, incl. process start) {wall:.1f} s.",
        "",
        "Per-step mean loss (averaged over ranks), in means of 5 steps: " + ", ".join(f"{m:.4f}" for m in means),
        "",
        "Every step: " + ", ".join(f"{v:.4f}" for v in losses),
        "",
        f"Loss of the EMA weights on a fixed probe batch (64 noises, grid indices spread over 0..249): "
        f"{before:.4f} before (the teacher's weights) -> {after:.4f} after ({after / before:.2f}x).",
        "",
        "Snapshot round trip (network-snapshot pickled as EDM does: networks persistent, loss_fn by plain pickle):",
        f"- `pid-fast convert`: exit {conv.exit_code}; its report: "
        + "; ".join(line.strip() for line in conv.output.splitlines()[1:]),
        f"- converted weights vs the loop's EMA in memory: max abs diff {weight_diff:.3g}",
        f"- `pid-fast sample` (16 seeds, one step at sigma_min) vs x = (t/T) n + (1 - t/T) F(c n, ln(t)/4) "
        f"computed from the EMA in memory: max abs diff {sample_diffs[0]:.3g} (.pkl), {sample_diffs[1]:.3g} "
        f"(converted)",
        f"- EDMPIDLoss pickles to {len(blob)} bytes (settings + the teacher's path); after unpickling, the same "
        f"RNG seed gives a loss equal to the original's: {bool(torch.equal(a, b))} (max diff "
        f"{float((a - b).abs().max()):.3g})",
        f"- nothing executed from the snapshot's embedded source: {not os.path.exists(marker)}",
    ]
    return grad_lines, lines


def main_(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "dropin.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grad_lines, loop_lines = loop_numbers(args.steps)
    cost_lines = cost_numbers(args.repeats)
    text = "\n".join([
        "# The drop-in loss inside other trainers (issue #25)", "",
        "Made by `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dropin_overhead.py "
        f"--steps {args.steps} --repeats {args.repeats}` on the CPU (torch {torch.__version__}); "
        "relative differences are L2 norms of the difference over the reference's norm. The 2-core machine "
        f"was shared (load average {os.getloadavg()[0]:.1f} at the end): the times are indicative, the "
        "variants' relative times are interleaved round-robin.", "",
        "## 1. DDP gradients (2 gloo processes, relative L2)", "", *grad_lines, "",
        "## 2. EDM-shaped stand-in loop with `EDMPIDLoss`", "", *loop_lines, "",
        "## 3. Calling through the wrapper vs the raw path (1 process, batch 16, 1 thread)", "",
        "DDP in a 1-process gloo group (its hooks and all-reduce run). The fp64 reference is the raw path with "
        "student and teacher in float64. The preconditioned path recovers F = (D - c_skip x)/c_out from D's fp32 "
        "rounding (c_out ~ t at sigma_min), which the residual's t/(t - t2) amplifies.", "", *cost_lines, ""])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main_()
