"""fd vs jvp on the Gaussian-mixture teacher, whose PF-ODE is solved exactly: the one-step
student's endpoint error against the exact x(sigma_min) at equal steps, per grid size N.

    OMP_NUM_THREADS=1 python benchmarks/jvp_endpoint.py --out benchmarks/results/jvp_endpoint-cpu.json
"""

from __future__ import annotations

import argparse
import json

import torch

from pid_fast.demo.analytic_sweep import distill, endpoint_error
from pid_fast.models.analytic import default_mixture


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--Ns", type=int, nargs="+", default=[16, 64, 250])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num", type=int, default=4096, help="test noises")
    p.add_argument("--out", default="benchmarks/results/jvp_endpoint-cpu.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    teacher = default_mixture()
    z = torch.randn((args.num, *teacher.sample_shape), generator=torch.Generator().manual_seed(123))
    exact = teacher.ode_solution(z.double() * 80.0, 80.0, 0.002)
    rows = []
    for N in args.Ns:
        for derivative in ("fd", "jvp"):
            errs = [endpoint_error(distill(teacher, N, steps=args.steps, seed=seed, derivative=derivative),
                                   teacher, z, exact=exact)["rmse"] for seed in args.seeds]
            rows.append({"N": N, "derivative": derivative, "rmse_per_seed": errs, "rmse_mean": sum(errs) / len(errs)})
            print(json.dumps(rows[-1]))
    command = ("OMP_NUM_THREADS=1 python benchmarks/jvp_endpoint.py --Ns " + " ".join(map(str, args.Ns))
               + f" --steps {args.steps} --seeds " + " ".join(map(str, args.seeds)))
    with open(args.out, "w") as f:
        json.dump({"command": command, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
