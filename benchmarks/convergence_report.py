"""convergence.md and convergence.png from benchmarks/results/convergence-cpu.json (written by
benchmarks/convergence.py; `python benchmarks/convergence.py report` calls write_report). The
hand-written reading of the numbers (decisions, caveats) lives in convergence-notes.md and is
copied in under the teacher's line."""

from __future__ import annotations

import os

TARGET = 1.05
STEPS_SHOWN = (100, 200, 300, 400, 600, 1200)
# drawn thick: the demo's recipe before and after benchmarks/results/convergence-notes.md's choice
HIGHLIGHT = {("demo", "ema-0.998"), ("cosine-b2", "model+teacher-0.2"), ("cosine-b2-600", "model+teacher-0.2")}


def steps_to_target(curve: dict, teacher: float, target: float = TARGET):
    """The first step whose FD is within ``target`` x the teacher's (None: never)."""
    for step in sorted(curve, key=int):
        if curve[step] <= target * teacher:
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
            + f"; max - min = {spread:.1f}%. Curves and 'steps to 1.05x' use seeds {first}+ (target "
            f"{TARGET} x {fds[first]:.3f} = {TARGET * fds[first]:.3f}); the held-out table scores the last step on "
            f"every seed set against the teacher's FD on the same seeds. FD to teacher: the Frechet distance "
            f"between the student's and the teacher's samples from the same seeds (0 = the teacher's distribution).")


def _cell(curve: dict, step: int) -> str:
    return f"{curve[str(step)]:.3f}" if str(step) in curve else "-"


def curves_table(results: dict) -> list[str]:
    fds = _teacher_fds(results)
    teacher = next(iter(fds.values()))
    shown = [s for s in STEPS_SHOWN if any(str(s) in c for row in results["recipes"].values()
                                           for c in row.get("digits", {}).get("fd", {}).values())]
    lines = ["| recipe | weights | steps to 1.05x teacher FD | " + " | ".join(f"FD @{s}" for s in shown)
             + " | FD to teacher @last | GM endpoint RMSE @200 | @400 | @600 |",
             "|---|---|---|" + "---|" * len(shown) + "---|---|---|---|"]
    for name, row in results["recipes"].items():
        digits, gm = row.get("digits", {}), row["gm"]["rmse"]
        curves, to_teacher = digits.get("fd", {}), digits.get("fd_teacher", {})
        for weights in list(curves) or ["model"]:  # (the GM run's other EMAs: in the JSON)
            curve = curves.get(weights, {})
            reached = steps_to_target(curve, teacher) if curve else None
            last = max(map(int, curve)) if curve else 0
            lines.append(f"| {name} | {weights} | {reached if reached else (f'> {last}' if curve else '-')} | "
                         + " | ".join(_cell(curve, s) for s in shown) + " | "
                         + (_cell(to_teacher.get(weights, {}), last) if curve else "-") + " | "
                         + " | ".join(_cell(gm.get(weights, {}), s) for s in (200, 400, 600)) + " |")
    return lines


def heldout_table(results: dict) -> list[str]:
    fds = _teacher_fds(results)
    rows = [(name, row["digits"]["heldout"]) for name, row in results["recipes"].items()
            if row.get("digits", {}).get("heldout", {}).get("scores")]
    if not rows:
        return []
    lines = ["", "Every seed set at the last step (FD, and FD / the teacher's FD on the same seeds):", "",
             "| recipe | weights | step | " + " | ".join(f"seeds {k}+" for k in fds)
             + " | mean ratio | mean FD to teacher |", "|---|---|---|" + "---|" * len(fds) + "---|---|"]
    for name, held in rows:
        for weights, by_seed in held["scores"].items():
            ratios = [by_seed[k]["fd"] / fds[k] for k in fds if k in by_seed]
            to_teacher = [by_seed[k]["fd_teacher"] for k in fds if k in by_seed]
            lines.append(f"| {name} | {weights} | {held['step']} | "
                         + " | ".join(f"{by_seed[k]['fd']:.3f} ({by_seed[k]['fd'] / fds[k]:.3f}x)" if k in by_seed
                                      else "-" for k in fds)
                         + f" | **{sum(ratios) / len(ratios):.3f}x** | {sum(to_teacher) / len(to_teacher):.3f} |")
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
    """FD against steps (left) and GM endpoint RMSE against steps (right), one line per recipe
    and weights; the teacher's FD and the 1.05x target as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = next(iter(_teacher_fds(results).values()))
    fig, (ax_fd, ax_gm) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = iter(plt.get_cmap("tab20").colors * 3)
    for name, row in results["recipes"].items():
        digits = row.get("digits", {}).get("fd", {})
        for weights in list(digits) or ["model"]:  # the weights of the table's rows
            style = dict(color=next(colors), marker="o", ms=3, label=f"{name} {weights}",
                         lw=2.5 if (name, weights) in HIGHLIGHT else 1)
            for ax, curve in ((ax_fd, digits.get(weights)), (ax_gm, row["gm"]["rmse"].get(weights))):
                if curve:
                    steps = sorted(map(int, curve))
                    ax.plot(steps, [curve[str(s)] for s in steps], **style)
    ax_fd.axhline(teacher, color="k", lw=1, label="teacher (Heun 35 NFE)")
    ax_fd.axhline(TARGET * teacher, color="k", lw=1, ls="--", label=f"{TARGET} x teacher")
    ax_fd.set(yscale="log", xlabel="step (batch 64)", ylabel=f"digits FD ({results['num_samples']} samples)",
              title="digits teacher: one-step FD")
    ax_gm.set(yscale="log", xlabel="step (batch 64)", ylabel="endpoint RMSE vs exact ODE",
              title="Gaussian-mixture teacher: one-step endpoint error")
    for ax in (ax_fd, ax_gm):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
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
