"""convergence.md and convergence.png from benchmarks/results/convergence-cpu.json (written by
benchmarks/convergence.py; `python benchmarks/convergence.py report` calls write_report). The
hand-written reading of the numbers (decisions, caveats) lives in convergence-notes.md and is
copied in under the teacher's line."""

from __future__ import annotations

import itertools
import os

TARGET = 1.05  # the FD-to-data target of the earlier tables: within 1.05x the teacher's
# The distance-to-teacher target (issue 28): what the previous 1200-step demo recipe's EMA 0.998
# reached: FD to the teacher's samples <= 0.16 (10000 samples) and RMSE to Heun <= 0.140.
TARGET_FD_TEACHER, TARGET_RMSE = 0.16, 0.140
STEPS_SHOWN = (100, 200, 300, 400, 600, 1000, 1200)
# drawn thick: the demo's recipe before and after benchmarks/results/convergence-notes.md's choice
HIGHLIGHT = {("demo", "ema-0.998"), ("cosine-b2", "model+teacher-0.2"), ("warmup-clip-8e-3", "model+teacher-0.1"),
             ("warmup-clip-8e-3-800-seed0", "model+teacher-0.05"), ("warmup-clip-8e-3-inv-time3-600-seed0", "model+teacher-0.1"),
             ("warmup-clip-8e-3-k3-inv-time3", "model+teacher-0.1")}


def steps_to_target(curve: dict, teacher: float, target: float = TARGET):
    """The first step whose FD is within ``target`` x the teacher's (None: never)."""
    for step in sorted(curve, key=int):
        if curve[step] <= target * teacher:
            return int(step)
    return None


def steps_to_teacher(fd_teacher: dict, rmse: dict, fd_target: float = TARGET_FD_TEACHER,
                     rmse_target: float = TARGET_RMSE):
    """The first step whose FD to the teacher's samples and RMSE to Heun both meet their targets
    (None: never, or no RMSE measured)."""
    for step in sorted(fd_teacher, key=int):
        if step in rmse and fd_teacher[step] <= fd_target and rmse[step] <= rmse_target:
            return int(step)
    return None


def _teacher_fds(results: dict) -> dict[str, float]:
    return {k: row["fd"] for k, row in sorted(results["teacher"].items())}


def _teacher_line(results: dict) -> str:
    fds = _teacher_fds(results)
    first = next(iter(fds))
    spread = 100 * (max(fds.values()) - min(fds.values())) / min(fds.values())
    return (f"Teacher (EDM Heun, 35 NFE) digits FD, {results['num_samples']} samples per seed set: "
            + ", ".join(f"{fd:.3f} (seeds {k}+)" for k, fd in fds.items())
            + f"; max - min = {spread:.1f}%. Curves use seeds {first}+. First the distance to the teacher: "
            f"FD to teacher, the Frechet distance between the student's and the teacher's samples from the same "
            f"seeds (0 = the teacher's distribution), and RMSE to Heun, the per-pixel RMS distance to the teacher's "
            f"sample from the same noise; 'steps to target' is the first scored step with FD to teacher <= "
            f"{TARGET_FD_TEACHER} and RMSE to Heun <= {TARGET_RMSE} (what the previous 1200-step demo recipe's EMA "
            f"0.998 reached). Then the FD to the data and the earlier target, within {TARGET}x the teacher's FD to "
            f"the data ({TARGET} x {fds[first]:.3f} = {TARGET * fds[first]:.3f}). The held-out table scores the last "
            f"step on each seed set (the FD-to-data ratio against the teacher's FD on the same seeds).")


def _cell(curve: dict, step: int) -> str:
    return f"{curve[str(step)]:.3f}" if str(step) in curve else "-"


def curves_table(results: dict) -> list[str]:
    fds = _teacher_fds(results)
    teacher = next(iter(fds.values()))
    shown = [s for s in STEPS_SHOWN if any(str(s) in c for row in results["recipes"].values()
                                           for c in row.get("digits", {}).get("fd", {}).values())]
    lines = ["| recipe | weights | steps to target | " + " | ".join(f"FD to teacher @{s}" for s in shown)
             + " | RMSE to Heun @last | FD to data @last | steps to 1.05x teacher FD to data "
             "| GM endpoint RMSE @200 | @400 | @600 |",
             "|---|---|---|" + "---|" * len(shown) + "---|---|---|---|---|---|"]
    for name, row in results["recipes"].items():
        digits, gm = row.get("digits", {}), row["gm"]["rmse"]
        curves, to_teacher, rmse = digits.get("fd", {}), digits.get("fd_teacher", {}), digits.get("rmse_teacher", {})
        for weights in list(curves) or ["model"]:  # (the GM run's other EMAs: in the JSON)
            curve = curves.get(weights, {})
            reached = steps_to_target(curve, teacher) if curve else None
            close = steps_to_teacher(to_teacher.get(weights, {}), rmse.get(weights, {}))
            last = max(map(int, curve)) if curve else 0
            measured = bool(rmse.get(weights))  # (runs before the RMSE was recorded: no target)
            lines.append(f"| {name} | {weights} | {close if close else (f'> {last}' if measured else '-')} | "
                         + " | ".join(_cell(to_teacher.get(weights, {}), s) for s in shown) + " | "
                         + (_cell(rmse.get(weights, {}), last) if curve else "-") + " | "
                         + (_cell(curve, last) if curve else "-") + " | "
                         + f"{reached if reached else (f'> {last}' if curve else '-')} | "
                         + " | ".join(_cell(gm.get(weights, {}), s) for s in (200, 400, 600)) + " |")
    return lines


def heldout_table(results: dict) -> list[str]:
    fds = _teacher_fds(results)
    rows = [(name, row["digits"]["heldout"]) for name, row in results["recipes"].items()
            if row.get("digits", {}).get("heldout", {}).get("scores")]
    if not rows:
        return []
    lines = ["", "Every seed set at the last step: FD to the teacher's samples / RMSE to Heun / FD to data (and FD to "
             "data / the teacher's FD to data on the same seeds):", "",
             "| recipe | weights | step | " + " | ".join(f"seeds {k}+" for k in fds)
             + " | mean FD to teacher | mean RMSE to Heun | mean ratio |", "|---|---|---|" + "---|" * len(fds) + "---|---|---|"]
    first = next(iter(fds))
    marked = False
    for name, held in rows:
        curves = results["recipes"][name]["digits"]
        for weights, by_seed in held["scores"].items():
            # the means are over the held-out sets only (not the set the recipe and share were chosen on)
            ratios = [by_seed[k]["fd"] / fds[k] for k in fds if k in by_seed and k != first]
            to_teacher = [by_seed[k]["fd_teacher"] for k in fds if k in by_seed and k != first]
            rmse = [by_seed[k]["rmse_teacher"] for k in fds if "rmse_teacher" in by_seed.get(k, {}) and k != first]
            step = str(held["step"])
            selection = None  # seeds of the curves, not scored again: their values, marked, outside the means
            if first not in by_seed and step in curves.get("fd_teacher", {}).get(weights, {}):
                selection = {key: curves[key][weights][step] for key in ("fd_teacher", "rmse_teacher", "fd")
                             if step in curves.get(key, {}).get(weights, {})}

            def cell(k):
                r = by_seed.get(k, selection if k == first else None)
                if r is None:
                    return "-"
                d = f"{r['rmse_teacher']:.4f}" if "rmse_teacher" in r else "-"
                size = f" [{r['num']}]" if r.get("num", results["num_samples"]) != results["num_samples"] else ""
                return (f"{r['fd_teacher']:.3f} / {d} / {r['fd']:.3f} ({r['fd'] / fds[k]:.3f}x)"
                        + (" (a)" if k == first else "") + size)

            marked = marked or selection is not None or first in by_seed

            lines.append(f"| {name} | {weights} | {held['step']} | " + " | ".join(cell(k) for k in fds)
                         + (f" | **{sum(to_teacher) / len(to_teacher):.3f}** | " if to_teacher else " | - | ")
                         + (f"{sum(rmse) / len(rmse):.4f}" if rmse else "-")
                         + (f" | {sum(ratios) / len(ratios):.3f}x |" if ratios else " | - |"))
    small = any(r.get("num", results["num_samples"]) != results["num_samples"]
                for _, held in rows for by_seed in held["scores"].values() for r in by_seed.values())
    lines += [] if not small else ["", f"[n]: scored on the first n samples of that seed set (not {results['num_samples']}: CPU time), "
              "so its FDs carry a larger small-sample bias than the others and are not comparable with the "
              "10000-sample target; the RMSE is."]
    if marked:
        lines += ["", f"(a) seeds {first}+ (the curves' seeds): the seed set these recipes and shares were chosen "
                  "on, left out of the means (held out: the other sets)."]
    return lines


def sweep_table(results: dict) -> list[str]:
    sweeps = [(name, step, sweep) for name, row in results["recipes"].items()
              for step, sweep in row.get("digits", {}).get("power_sweep", {}).items()]
    if not sweeps:
        return []
    sigmas = sorted({float(s) for _, _, sw in sweeps for s in sw})
    lines = ["", "Post-hoc power EMA (`pid-fast power-ema`, reconstructed from the sigma_rel 0.05 / 0.10 snapshots "
             "every 50 steps), digits FD on the curves' seeds:", "",
             "| recipe | step | " + " | ".join(f"sigma_rel {s:g}" for s in sigmas) + " |", "|---|---|" + "---|" * len(sigmas)]
    for name, step, sweep in sweeps:
        by_sigma = {float(k): v for k, v in sweep.items()}
        lines.append(f"| {name} | {step} | " + " | ".join(f"{by_sigma[s]:.3f}" if s in by_sigma else "-" for s in sigmas)
                     + " |")
    return lines


def table(results: dict, notes: str = "") -> str:
    lines = [_teacher_line(results), ""] + ([notes.strip(), ""] if notes.strip() else [])
    lines += curves_table(results) + heldout_table(results) + sweep_table(results)
    lines += ["", "Recipes:", ""] + [f"- {name}: {row['description']} ({row['steps']} steps)"
                                     for name, row in results["recipes"].items()]
    lines += ["", "Commands:", ""] + [f"    {c}" for c in results["commands"]]
    return "\n".join(lines)


def plot(results: dict, path: str) -> str:
    """FD to the teacher's samples against steps (left) and GM endpoint RMSE against steps (right),
    one line per recipe and weights; the distance-to-teacher target as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_gm) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = itertools.cycle(plt.get_cmap("tab20").colors)
    for name, row in results["recipes"].items():
        digits = row.get("digits", {}).get("fd_teacher", {})
        for weights in list(digits) or ["model"]:  # the weights of the table's rows
            shown = (name, weights) in HIGHLIGHT  # the demo recipes, labelled; the others thin (convergence.md)
            style = dict(color=next(colors), marker="o", ms=3 if shown else 2, lw=2.5 if shown else 0.8,
                         alpha=1.0 if shown else 0.4, label=f"{name} {weights}" if shown else "_nolegend_")
            for ax, curve in ((ax_fd, digits.get(weights)), (ax_gm, row["gm"]["rmse"].get(weights))):
                if curve:
                    steps = sorted(map(int, curve))
                    ax.plot(steps, [curve[str(s)] for s in steps], **style)
    ax_fd.axhline(TARGET_FD_TEACHER, color="k", lw=1, ls="--", label=f"target {TARGET_FD_TEACHER}")
    ax_fd.set(yscale="log", xlabel="step (batch 64)",
              ylabel=f"FD to the teacher's samples ({results['num_samples']} samples)",
              title="digits teacher: one-step FD to the teacher's samples")
    ax_gm.set(yscale="log", xlabel="step (batch 64)", ylabel="endpoint RMSE vs exact ODE",
              title="Gaussian-mixture teacher: one-step endpoint error")
    for ax in (ax_fd, ax_gm):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="demo recipes (thin: the other rows of convergence.md)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, folder: str) -> str:
    """Write convergence.md (with convergence-notes.md, when present) and convergence.png."""
    notes_path = os.path.join(folder, "convergence-notes.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else ""
    text = "# Convergence: steps to the teacher (benchmarks/convergence.py)\n\n" + table(results, notes) + "\n"
    with open(os.path.join(folder, "convergence.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(folder, "convergence.png"))
    return text
