"""Convergence: how many PID steps a recipe needs to reach the teacher, on two teachers.

1. digits (the bundled teacher of `pid-fast demo`, batch 64): the one-step student's distance to
   the teacher (10000 samples, seeds 10000+, the same noises as the teacher's Heun 35-NFE samples:
   the FD between the student's and the teacher's samples, and the per-pixel RMSE to the teacher's
   sample from the same noise), then its digits FD to the data, every 100 steps for the chosen
   weights (raw, an EMA, a tracked power EMA, any of them blended with the teacher's weights:
   'model+teacher-0.2'), and the first step that reaches the target (TARGET_FD_TEACHER and
   TARGET_RMSE: what the previous 1200-step demo recipe's EMA 0.998 reached); `--heldout` weights
   are scored at the last step on the disjoint seed sets (SEED_SETS). Runs through the trainer
   (pid_fast.train.train); the teacher's samples (pid_fast.train.teacher_samples) are cached in
   WORK_DIR.
2. the Gaussian-mixture teacher (exact PF-ODE, pid_fast.models.analytic): the one-step MLP
   student's endpoint RMSE against the exact x(sigma_min) every 100 steps, with the same recipe
   (optimizer, lr schedule, EMAs, grid-index sampling and weighting, coarse-to-fine grid) and the
   trainer's own schedule pieces, mean over 2 training seeds.

    OMP_NUM_THREADS=1 python benchmarks/convergence.py teacher
    OMP_NUM_THREADS=1 python benchmarks/convergence.py run cosine-b2 --steps 400 --weights model model+teacher-0.2 \
        --heldout model+teacher-0.2
    OMP_NUM_THREADS=1 python benchmarks/convergence.py report

The exact commands of the committed results are in convergence.md. Runs and checkpoints go to
/tmp/pid-convergence/<name> (--name, default the recipe's). Results merge into
benchmarks/results/convergence-cpu.json (runs may finish in parallel); `report` writes
convergence.md and convergence.png (benchmarks/convergence_report.py). Recipes: RECIPES below
(each a set of trainer-config overrides over the demo's).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUT_JSON = os.path.join(RESULTS, "convergence-cpu.json")
WORK_DIR = "/tmp/pid-convergence"
NUM_SAMPLES, SEED_START, TARGET = 10000, 10000, 1.05
# The distance-to-teacher target: the previous demo recipe's EMA 0.998 after 1200 steps (FD to the
# teacher's samples on 10000 samples of seeds 10000+; RMSE to Heun on the demo's 1000 samples).
TARGET_FD_TEACHER, TARGET_RMSE = 0.16, 0.140
TEACHER_CHUNK = 1000  # teacher samples are cached per 1000 seeds (an interrupted run keeps its chunks)
SEED_SETS = (10000, 20000, 30000)  # disjoint: seeds 10000..19999, 20000..29999, 30000..39999
POWER_SIGMA_RELS = [0.05, 0.10]  # tracked in every run (passive: the training trajectory is unchanged)
SWEEP_SIGMA_RELS = [0.02, 0.035, 0.05, 0.07, 0.10, 0.15, 0.20]  # post hoc (0.05, 0.10: the tracked ones)


def _warmup_clip(lr: float, **extra) -> dict:
    """The warm-up + clipping recipes' overrides: RAdam (0.9, 0.99) at ``lr``, a 40-step warm-up, a
    cosine decay, gradients clipped at norm 1, EMAs 0.99/0.995, and ``extra`` config sections."""
    return {"optimizer": dict(_DEMO_OPT, lr=lr, betas=[0.9, 0.99]), "ema_rates": [0.99, 0.995],
            "lr_schedule": {"decay": "cosine", "warmup_steps": 40}, "clip_grad_norm": 1.0, **extra}


# Trainer-config overrides over the demo recipe (pid_fast.demo.settings): name -> (what, overrides)
_DEMO_OPT = {"name": "radam", "lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
RECIPES = {
    "demo": ("the demo's recipe before this change: RAdam 2e-3 constant, EMAs 0.995/0.998, uniform i, N 250",
             {"optimizer": _DEMO_OPT, "ema_rates": [0.995, 0.998]}),
    "reference": ("the reference's optimizer/lr/EMAs at batch 64: RAdam 2e-4 constant, EMAs 0.999/0.9999/0.99995",
                  {"optimizer": dict(_DEMO_OPT, lr=2e-4), "ema_rates": [0.999, 0.9999, 0.99995]}),
    "invsqrt": ("demo + 50-step warm-up + EDM2 inverse-sqrt decay after 100 steps",
                {"optimizer": _DEMO_OPT, "ema_rates": [0.995, 0.998],
                 "lr_schedule": {"warmup_steps": 50, "decay": "inv_sqrt", "decay_steps": 100}}),
    "edm2": ("EDM2's optimizer: Adam (0.9, 0.99), lr 1e-3, 50-step warm-up, inverse-sqrt decay after 100 steps",
             {"optimizer": dict(_DEMO_OPT, name="adam", lr=1e-3, betas=[0.9, 0.99]), "ema_rates": [0.995, 0.998],
              "lr_schedule": {"warmup_steps": 50, "decay": "inv_sqrt", "decay_steps": 100}}),
    "edm2-2e-3": ("edm2 with lr 2e-3",
                  {"optimizer": dict(_DEMO_OPT, name="adam", lr=2e-3, betas=[0.9, 0.99]), "ema_rates": [0.995, 0.998],
                   "lr_schedule": {"warmup_steps": 50, "decay": "inv_sqrt", "decay_steps": 100}}),
    "radam-b2": ("demo with RAdam betas (0.9, 0.99) (its built-in warm-up ~200 steps instead of ~2000)",
                 {"optimizer": dict(_DEMO_OPT, betas=[0.9, 0.99]), "ema_rates": [0.995, 0.998]}),
    "cosine": ("demo's optimizer (RAdam 2e-3) with a cosine lr decay to 0 at the run's last step",
               {"optimizer": _DEMO_OPT, "ema_rates": [0.995, 0.998], "lr_schedule": {"decay": "cosine"}}),
    "cosine-b2": ("cosine with RAdam betas (0.9, 0.99)",
                  {"optimizer": dict(_DEMO_OPT, betas=[0.9, 0.99]), "ema_rates": [0.995, 0.998],
                   "lr_schedule": {"decay": "cosine"}}),
    "cosine-b2-4e-3": ("cosine-b2 with lr 4e-3",
                       {"optimizer": dict(_DEMO_OPT, lr=4e-3, betas=[0.9, 0.99]), "ema_rates": [0.995, 0.998],
                        "lr_schedule": {"decay": "cosine"}}),
    "warmup-clip-4e-3": ("cosine-b2 with lr 4e-3, a 40-step linear warm-up and gradient clipping at norm 1 (the "
                         "first steps' norms are ~3), EMAs 0.99/0.995", _warmup_clip(4e-3)),
    "warmup-clip-8e-3": ("warmup-clip-4e-3 with lr 8e-3", _warmup_clip(8e-3)),
    "warmup-clip-16e-3": ("warmup-clip-4e-3 with lr 1.6e-2", _warmup_clip(1.6e-2)),
    "warmup-clip-8e-3-jvp": ("warmup-clip-8e-3 with the jvp derivative (one student evaluation and its forward-mode "
                             "derivative instead of the second evaluation at t2)",
                             _warmup_clip(8e-3, loss={"derivative": "jvp"})),
    "warmup-clip-8e-3-k3": ("warmup-clip-8e-3 with 3 grid indices per noise (the student and the teacher run on "
                            "3 x 64 rows: 64 noises, 3 points on each trajectory)",
                            _warmup_clip(8e-3, grid={"indices_per_noise": 3})),
    "warmup-clip-8e-3-l2": ("warmup-clip-8e-3 with the l2 norm instead of the demo's pseudo-Huber (c 0.01)",
                            _warmup_clip(8e-3, loss={"norm": "l2", "huber_c": None})),
    "warmup-clip-8e-3-k4": ("warmup-clip-8e-3 with 4 grid indices per noise (4 x 64 rows per pass)",
                            _warmup_clip(8e-3, grid={"indices_per_noise": 4})),
    "warmup-clip-12e-3-k3": ("warmup-clip-8e-3-k3 with lr 1.2e-2 (3 points per noise: less gradient noise per step)",
                             _warmup_clip(1.2e-2, grid={"indices_per_noise": 3})),
    "warmup-clip-8e-3-endpoint": ("warmup-clip-8e-3 weighting each grid index by its share of the one-step sample's "
                                  "error, (|t_i - t_i2| / t_i)^1 (grid.weighting 'endpoint'; ~4.8x at sigma_min "
                                  "against T)", _warmup_clip(8e-3, grid={"weighting": "endpoint"})),
    "warmup-clip-8e-3-endpoint2": ("warmup-clip-8e-3-endpoint with power 2 (~21x at sigma_min against T)",
                                   _warmup_clip(8e-3, grid={"weighting": "endpoint", "weighting_power": 2.0})),
    "warmup-clip-8e-3-endpoint-inv": ("warmup-clip-8e-3-endpoint with power -1: the opposite tilt, the indices near "
                                      "T weigh ~4.8x those at sigma_min",
                                      _warmup_clip(8e-3, grid={"weighting": "endpoint", "weighting_power": -1.0})),
    "warmup-clip-8e-3-endpoint-inv2": ("warmup-clip-8e-3-endpoint with power -2 (T's indices ~21x sigma_min's)",
                                       _warmup_clip(8e-3, grid={"weighting": "endpoint", "weighting_power": -2.0})),
    "warmup-clip-8e-3-inv-time3": ("warmup-clip-8e-3-endpoint-inv with the time path at 3x the lr (time3)",
                                   _warmup_clip(8e-3, grid={"weighting": "endpoint", "weighting_power": -1.0},
                                                optimizer=dict(_DEMO_OPT, lr=8e-3, betas=[0.9, 0.99],
                                                               lr_scale={"map_*": 3.0, "*.affine.*": 3.0}))),
    "warmup-clip-8e-3-inv2-time3": ("warmup-clip-8e-3-inv-time3 with endpoint power -2",
                                    _warmup_clip(8e-3, grid={"weighting": "endpoint", "weighting_power": -2.0},
                                                 optimizer=dict(_DEMO_OPT, lr=8e-3, betas=[0.9, 0.99],
                                                                lr_scale={"map_*": 3.0, "*.affine.*": 3.0}))),
    "warmup-clip-8e-3-inv-time10": ("warmup-clip-8e-3-inv-time3 with the time path at 10x the lr",
                                    _warmup_clip(8e-3, grid={"weighting": "endpoint", "weighting_power": -1.0},
                                                 optimizer=dict(_DEMO_OPT, lr=8e-3, betas=[0.9, 0.99],
                                                                lr_scale={"map_*": 10.0, "*.affine.*": 10.0}))),
    "warmup-clip-8e-3-k3-inv-time3": ("warmup-clip-8e-3-inv-time3 with 3 grid indices per noise (3 x 64 rows)",
                                      _warmup_clip(8e-3, grid={"weighting": "endpoint", "weighting_power": -1.0,
                                                               "indices_per_noise": 3},
                                                   optimizer=dict(_DEMO_OPT, lr=8e-3, betas=[0.9, 0.99],
                                                                  lr_scale={"map_*": 3.0, "*.affine.*": 3.0}))),
    "warmup-clip-8e-3-time3": ("warmup-clip-8e-3 with the time path at 3x the lr (optimizer.lr_scale: the noise "
                               "embedding map_* and every block's affine emb -> scale/shift layer, 15k of the 292k "
                               "parameters; the student reads t as a trajectory time, not the teacher's noise level)",
                               _warmup_clip(8e-3, optimizer=dict(_DEMO_OPT, lr=8e-3, betas=[0.9, 0.99],
                                                                 lr_scale={"map_*": 3.0, "*.affine.*": 3.0}))),
    "cosine-b2-jvp": ("cosine-b2 with the jvp derivative (one student evaluation and its forward-mode derivative "
                      "instead of the second evaluation), EMAs 0.99/0.995",
                      {"optimizer": dict(_DEMO_OPT, betas=[0.9, 0.99]), "ema_rates": [0.99, 0.995],
                       "lr_schedule": {"decay": "cosine"}, "loss": {"derivative": "jvp"}}),
    "cosine-b2-ema99": ("cosine-b2 with EMAs 0.99/0.995 (the baseline of the distance-to-teacher runs)",
                        {"optimizer": dict(_DEMO_OPT, betas=[0.9, 0.99]), "ema_rates": [0.99, 0.995],
                         "lr_schedule": {"decay": "cosine"}}),
    "importance": ("cosine-b2 + grid indices drawn by importance (per-index running loss, reweighted)",
                   {"optimizer": dict(_DEMO_OPT, betas=[0.9, 0.99]), "ema_rates": [0.995, 0.998],
                    "lr_schedule": {"decay": "cosine"}, "grid": {"sampling": "importance"}}),
    "adaptive": ("cosine-b2 + adaptive w(t) (each index's loss over its running mean)",
                 {"optimizer": dict(_DEMO_OPT, betas=[0.9, 0.99]), "ema_rates": [0.995, 0.998],
                  "lr_schedule": {"decay": "cosine"}, "grid": {"weighting": "adaptive"}}),
    "coarse2fine": ("cosine-b2 + coarse-to-fine grid: N' = 84 (nested, stride 3) for the first 150 steps, then 250",
                    {"optimizer": dict(_DEMO_OPT, betas=[0.9, 0.99]), "ema_rates": [0.995, 0.998],
                     "lr_schedule": {"decay": "cosine"}, "grid": {"coarse_to_fine": [[150, 84]]}}),
}


def recipe_config(name: str, steps: int, seed: int = 0) -> dict:
    """The trainer config of recipe ``name``: the demo's config (its lr schedule and grid pinned
    to the reference's, except for the 'default' recipe, which is today's demo config as is) with
    the recipe's overrides, a checkpoint every 100 steps (all kept) and the power-EMA snapshots."""
    from pid_fast.demo.files import DEFAULT_TEACHER
    from pid_fast.demo.settings import DEMO_DEFAULTS, demo_config
    from pid_fast.train import resolve_config

    d = DEMO_DEFAULTS
    cfg = demo_config(DEFAULT_TEACHER, steps=steps, batch_size=64, lr=d["lr"], N=250, norm="huber", huber_c=0.01,
                      ema_rates=d["ema_rates"], chunk=100, seed=seed, progress=False)
    if name != "default":
        cfg.update(copy.deepcopy(_REFERENCE_SCHEDULES))
    for key, value in RECIPES[name][1].items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    if cfg["lr_schedule"]["decay"] == "cosine":  # to 0 at the run's last step
        cfg["lr_schedule"]["decay_steps"] = steps
    power = cfg.get("power_ema", {}).get("sigma_rels", [])
    cfg.update(snapshot_every=0, log_every=50, checkpoint_every=100, keep_checkpoints=0,
               power_ema={"sigma_rels": sorted(set(power) | set(POWER_SIGMA_RELS)), "snapshot_every": 50})
    return resolve_config(cfg)


_REFERENCE_SCHEDULES = {"lr_schedule": {"warmup_steps": 0, "decay": "constant", "decay_steps": 1000},
                        "grid": {"sampling": "uniform", "weighting": "uniform", "stats_decay": 0.99,
                                 "uniform_mix": 0.5, "coarse_to_fine": []}}


# --------------------------------------------------------------------------------------------
# Digits


def teacher_images(seed_start: int, num: int = NUM_SAMPLES) -> torch.Tensor:
    """The teacher's Heun samples (18 steps = 35 evaluations, EDM's grid) of seeds seed_start..+num
    (pid_fast.train.teacher_samples, as `pid-fast sample --teacher` writes them), cached in WORK_DIR
    (10000 take ~12 CPU-minutes)."""
    from pid_fast.demo.files import DEFAULT_TEACHER
    from pid_fast.train.teacher_samples import load_sampling_teacher, teacher_samples

    cache = os.path.join(WORK_DIR, f"heun-{seed_start}-{num}.pt")
    if os.path.exists(cache):
        return torch.load(cache)
    full = os.path.join(WORK_DIR, f"heun-{seed_start}-{NUM_SAMPLES}.pt")
    if num < NUM_SAMPLES and os.path.exists(full):  # the first num of a full set's samples
        return torch.load(full)[:num]
    os.makedirs(WORK_DIR, exist_ok=True)
    teacher, chunks = None, []
    for start in range(seed_start, seed_start + num, TEACHER_CHUNK):
        stop = min(start + TEACHER_CHUNK, seed_start + num)
        chunk_path = os.path.join(WORK_DIR, f"heun-{start}-{stop - start}.pt")
        if not os.path.exists(chunk_path):
            if teacher is None:
                teacher, shape, label_dim = load_sampling_teacher(DEFAULT_TEACHER)
            images, _ = teacher_samples(teacher, shape, label_dim, range(start, stop), solver="heun", num_steps=18,
                                        grid="karras", batch=500)
            torch.save(images, chunk_path + ".tmp")
            os.replace(chunk_path + ".tmp", chunk_path)
        chunks.append(chunk_path)
    images = torch.cat([torch.load(path) for path in chunks])
    torch.save(images, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return images


class Scorer:
    """One seed set's scores of a one-step student: first its distance to the teacher's own
    samples from the same seeds (the distillation's fidelity; 0 for the teacher itself): the FD
    between the two sample sets in the digits classifier's feature space and the per-pixel RMSE to
    the teacher's sample from the same noise; then its digits FD against the 1797 real digits."""

    def __init__(self, seed_start: int, num: int = NUM_SAMPLES):
        from pid_fast.eval.metrics import DigitsFeatures, TeacherDistance, digits_reference_features, feature_statistics

        self.seed_start, self.num = seed_start, num
        self.features = DigitsFeatures()
        self.data = feature_statistics(digits_reference_features(self.features))
        self.teacher = TeacherDistance(teacher_images(seed_start, num), self.features)

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        from pid_fast.eval.metrics import fd_from_features

        feats = self.features.features(images)
        return {**self.teacher.from_features(feats, images), "fd": float(fd_from_features(feats, self.data))}

    def student(self, net, meta) -> dict[str, float]:
        from pid_fast.train import generate

        images, _ = generate(net, meta, range(self.seed_start, self.seed_start + self.num), batch=500)
        return self(images)


def teacher_fd(seed_start: int, num: int = NUM_SAMPLES) -> dict:
    """The teacher's digits FD on seeds seed_start..+num."""
    from pid_fast.eval.metrics import digits_fd

    return {"seed_start": seed_start, "num": num, "fd": float(digits_fd(teacher_images(seed_start, num)))}


def load_weights(path: str, weights: str):
    """(network, metadata) of a checkpoint's 'model', 'ema-<rate>' or 'power-<sigma_rel>' (a
    tracked power EMA), optionally '+teacher-<share>': blended as (1 - share) w + share x the
    initial (teacher's) weights, as `pid-fast demo --teacher-share` scores them."""
    from pid_fast.demo.files import DEFAULT_TEACHER
    from pid_fast.demo.teacher import load_digits_teacher
    from pid_fast.train import load_student
    from pid_fast.train.teacher_share import blend_with_initial

    weights, _, share = weights.partition("+teacher-")
    net, meta = load_student(path, weights="model" if weights.startswith("power-") else weights)
    if weights.startswith("power-"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["power_ema"][repr(float(weights[6:]))])
    if share:
        initial = load_digits_teacher(DEFAULT_TEACHER).model.state_dict()
        net.load_state_dict(blend_with_initial(net.state_dict(), initial, float(share)))
    return net, meta


def run_digits(recipe: str, name: str, steps: int, weights_every: dict[str, tuple[int, int]], heldout: list[str],
               sweep_steps: list[int], sweep_sigma_rels: list[float], train_seed: int = 0) -> dict:
    """Train ``recipe`` for ``steps`` in WORK_DIR/``name`` (checkpoint every 100), then score its checkpoints on
    seed set SEED_START: {"fd"|"fd_teacher": {weights: {step: value}}} for each weights at the
    multiples of weights_every[weights][0] up to weights_every[weights][1]; the ``heldout``
    weights at the last step on every seed set of SEED_SETS ({weights: {seed_start: scores}});
    and the post-hoc power-EMA sweep {step: {sigma_rel: fd}} at ``sweep_steps``."""
    from pid_fast.train import list_checkpoints, train
    from pid_fast.train.power_ema import reconstruct

    run_dir = os.path.join(WORK_DIR, name)
    cfg = recipe_config(recipe, steps, seed=train_seed)
    have = dict(list_checkpoints(run_dir)) if os.path.isdir(run_dir) else {}
    cpu0 = time.process_time()
    if steps not in have:
        train(cfg, run_dir, resume=True)
    train_cpu_s = time.process_time() - cpu0
    checkpoints = dict(list_checkpoints(run_dir))
    scorer = Scorer(SEED_START)
    curves: dict[str, dict[str, dict[int, float]]] = {"fd_teacher": {}, "rmse_teacher": {}, "fd": {}}
    for step, path in sorted(checkpoints.items()):
        for weights, (every, until) in weights_every.items():
            if step % every == 0 and step <= min(steps, until):
                scores = scorer.student(*load_weights(path, weights))
                for key, value in scores.items():
                    curves[key].setdefault(weights, {})[step] = value
                print(f"{name} step {step} {weights}: {scores}", flush=True)
    held: dict[str, dict[int, dict]] = {}
    for seed_start in (SEED_SETS if heldout else ()):
        other = scorer if seed_start == SEED_START else Scorer(seed_start)
        for weights in heldout:
            if seed_start == SEED_START and steps in curves["fd"].get(weights, {}):  # scored above
                held.setdefault(weights, {})[seed_start] = {k: c[weights][steps] for k, c in curves.items()}
                continue
            held.setdefault(weights, {})[seed_start] = other.student(*load_weights(checkpoints[steps], weights))
            print(f"{name} step {steps} {weights} seeds {seed_start}+: {held[weights][seed_start]}", flush=True)
    sweep: dict[int, dict[float, float]] = {}
    for step in sweep_steps:
        net, meta = load_weights(checkpoints[step], "model")
        for sigma_rel in sweep_sigma_rels:
            state_dict, _ = reconstruct(run_dir, sigma_rel, step)
            net.load_state_dict(state_dict)
            sweep.setdefault(step, {})[sigma_rel] = scorer.student(net, meta)["fd"]
            print(f"{name} step {step} power EMA sigma_rel {sigma_rel} (reconstructed): FD {sweep[step][sigma_rel]:.4f}",
                  flush=True)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        losses = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    return {"config": cfg, "train_cpu_s": train_cpu_s, **curves, "heldout": {"step": steps, "scores": held},
            "power_sweep": sweep, "loss": losses}


def run_heldout(name: str, steps: int, weights: list[str], seed_starts: list[int], num: int) -> dict:
    """The ``weights`` of run WORK_DIR/``name`` at ``steps`` scored on each seed set of ``seed_starts``
    with ``num`` samples: {weights: {seed_start: scores}} (a run trained by `run` before)."""
    from pid_fast.train import list_checkpoints

    path = dict(list_checkpoints(os.path.join(WORK_DIR, name)))[steps]
    held: dict[str, dict[int, dict]] = {}
    for seed_start in seed_starts:
        scorer = Scorer(seed_start, num)
        for w in weights:
            held.setdefault(w, {})[seed_start] = scorer.student(*load_weights(path, w))
            print(f"{name} step {steps} {w} seeds {seed_start}+ ({num}): {held[w][seed_start]}", flush=True)
    return held


# --------------------------------------------------------------------------------------------
# Gaussian mixture


def run_gm(name: str, steps: int, seeds=(0, 1), num: int = 4096, batch: int = 64) -> dict:
    """Endpoint RMSE against the exact ODE every 100 steps for the raw weights, each EMA and
    each power EMA: the recipe's optimizer, lr schedule, grid sampler/weighting and coarse-to-fine
    grid on an MLP student, mean over ``seeds``."""
    from pid_fast.demo.analytic_sweep import endpoint_error
    from pid_fast.loss import PIDLoss
    from pid_fast.models.analytic import MLPStudent, default_mixture
    from pid_fast.train.builders import build_optimizer
    from pid_fast.train.ema import EMA
    from pid_fast.train.power_ema import PowerEMA
    from pid_fast.train.schedules import GridIndexSampler, grid_size_at, lr_factor

    cfg = recipe_config(name, steps)
    teacher = default_mixture()
    z = torch.randn((num, *teacher.sample_shape), generator=torch.Generator().manual_seed(123))
    cache = os.path.join(WORK_DIR, f"gm-exact-{num}.pt")  # the exact solution takes ~30 s
    if os.path.exists(cache):
        exact = torch.load(cache)
    else:
        exact = teacher.ode_solution(z.double() * 80.0, 80.0, 0.002)
        os.makedirs(WORK_DIR, exist_ok=True)
        torch.save(exact, cache)
    curves: dict[str, dict[int, list[float]]] = {}
    for seed in seeds:
        torch.manual_seed(seed)
        student = MLPStudent(teacher.dim)
        loss_fn = PIDLoss(teacher, N=cfg["loss"]["N"], norm="l2", derivative=cfg["loss"]["derivative"])
        # (the MLP's parameters: optimizer.lr_scale's U-Net name patterns do not apply here)
        opt = build_optimizer(student.parameters(), cfg["optimizer"], torch.device("cpu"))
        ema, power = EMA(student, cfg["ema_rates"]), PowerEMA(student, POWER_SIGMA_RELS)
        grid, sched = cfg["grid"], cfg["lr_schedule"]
        sampler = GridIndexSampler(cfg["loss"]["N"], grid["sampling"], grid["weighting"], decay=grid["stats_decay"],
                                   uniform_mix=grid["uniform_mix"], power=grid["weighting_power"],
                                   times=(loss_fn.sigma_min, loss_fn.sigma_max, loss_fn.rho))
        gen = torch.Generator().manual_seed(seed + 1)
        k = grid["indices_per_noise"]
        for step in range(steps):
            n = grid_size_at(step, cfg["loss"]["N"], grid["coarse_to_fine"])
            loss_fn.N = n
            noise = torch.randn((batch, *teacher.sample_shape), generator=gen)
            indices = sampler.draw_indices(gen, batch * k, n)  # k grid points per noise, as the trainer
            weights = sampler.weights_for(indices, n)
            per_sample = loss_fn.per_sample(student, noise.repeat_interleave(k, 0) * 80.0, indices=indices)
            sampler.observe(indices, per_sample, n)
            loss = (per_sample if weights is None else per_sample * weights).mean()
            for group in opt.param_groups:
                group["lr"] = cfg["optimizer"]["lr"] * lr_factor(step, sched["warmup_steps"], sched["decay"],
                                                                  sched["decay_steps"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["clip_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg["clip_grad_norm"])
            opt.step()
            ema.update(student)
            power.update(student, step + 1)
            if (step + 1) % 100 == 0:
                nets = {"model": student, **{f"ema-{r!r}": m for r, m in ema.models.items()},
                        **{f"power-{s!r}": m for s, m in power.models.items()}}
                for weights_name, net in nets.items():
                    err = endpoint_error(net.eval(), teacher, z, exact=exact)["rmse"]
                    curves.setdefault(weights_name, {}).setdefault(step + 1, []).append(err)
                student.train()
    return {"rmse": {w: {s: sum(v) / len(v) for s, v in c.items()} for w, c in curves.items()},
            "seeds": list(seeds), "batch": batch, "num_eval": num}


# --------------------------------------------------------------------------------------------
# Results


def _load() -> dict:
    if os.path.exists(OUT_JSON):
        with open(OUT_JSON) as f:
            return json.load(f)
    return {"num_samples": NUM_SAMPLES, "teacher": {}, "recipes": {}, "commands": []}


def _save(results: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    results["torch"] = torch.__version__
    with open(OUT_JSON, "w") as f:
        json.dump(results, f, indent=2)


def _named(command: str):
    """The --name of a recorded command (None without one)."""
    words = command.split()
    return words[words.index("--name") + 1] if "--name" in words else None


def _merge(update, command: str, replaces: str) -> None:
    """Apply ``update`` to the results file as it is now (runs may finish in parallel) and
    record ``command`` in place of the commands starting with ``replaces``."""
    results = _load()
    update(results)
    name = _named(command)  # a run under --name replaces only the commands of that name
    results["commands"] = [c for c in results["commands"]
                           if not (c.startswith(replaces) and _named(c) == name)] + [command]
    _save(results)


def _weights_every(specs: list[str], steps: int) -> dict[str, tuple[int, int]]:
    """'name', 'name:every' or 'name:every:until' -> {name: (every, until)} (every: 100)."""
    every = {}
    for spec in specs:
        parts = spec.split(":")
        every[parts[0]] = (int(parts[1]) if len(parts) > 1 else 100, int(parts[2]) if len(parts) > 2 else steps)
    return every


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("teacher", help="the teacher's FD on seed sets")
    t.add_argument("--seed-starts", type=int, nargs="+", default=list(SEED_SETS))
    r = sub.add_parser("run", help="train and score one recipe on both teachers")
    r.add_argument("recipe", choices=sorted(RECIPES))
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--weights", nargs="+", default=None,
                   help="weights to score every 100 steps on seeds 10000+: model, ema-<rate>, power-<sigma_rel>, "
                        "any of them + '+teacher-<share>' (blended with the teacher's weights); name:every or "
                        "name:every:until for another interval or a last step; default: model and each EMA")
    r.add_argument("--heldout", nargs="*", default=[], help="weights scored at the last step on every seed set")
    r.add_argument("--sweep-steps", type=int, nargs="*", default=[], help="steps of the post-hoc power-EMA sweep")
    r.add_argument("--sweep-sigma-rels", type=float, nargs="*", default=SWEEP_SIGMA_RELS)
    r.add_argument("--skip-digits", action="store_true")
    r.add_argument("--name", default=None, help="the run's folder and results key (default: the recipe's name)")
    r.add_argument("--train-seed", type=int, default=0,
                   help="the digits run's config seed (its noises and grid indices; another seed: use --name)")
    h = sub.add_parser("heldout", help="score a trained run's weights on seed sets (after `run`)")
    h.add_argument("name", help="the run's name (its folder in WORK_DIR and results key)")
    h.add_argument("--steps", type=int, default=400)
    h.add_argument("--weights", nargs="+", required=True)
    h.add_argument("--seed-starts", type=int, nargs="+", default=list(SEED_SETS))
    h.add_argument("--num", type=int, default=NUM_SAMPLES, help="samples per seed set")
    sub.add_parser("report", help="write convergence.md and convergence.png from the JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.what == "report":
        from convergence_report import write_report

        print(write_report(_load(), RESULTS))
        return
    if args.what == "heldout":
        held = run_heldout(args.name, args.steps, args.weights, args.seed_starts, args.num)
        command = (f"OMP_NUM_THREADS=1 python benchmarks/convergence.py heldout {args.name} --steps {args.steps} "
                   f"--weights {' '.join(args.weights)} --seed-starts {' '.join(map(str, args.seed_starts))} "
                   f"--num {args.num}")

        def update(results):
            digits = results["recipes"][args.name]["digits"]
            scores = digits.get("heldout", {}).get("scores", {}) if digits.get("heldout", {}).get("step") == args.steps \
                else {}
            for w, by_seed in held.items():
                scores.setdefault(w, {}).update({str(k): {**v, "num": args.num} for k, v in by_seed.items()})
            digits["heldout"] = {"step": args.steps, "scores": scores}

        _merge(update, command, command)
        return
    if args.what == "teacher":
        rows = {str(seed_start): teacher_fd(seed_start) for seed_start in args.seed_starts}
        print(rows, flush=True)
        command = "OMP_NUM_THREADS=1 python benchmarks/convergence.py teacher"
        if list(args.seed_starts) != list(SEED_SETS):
            command += " --seed-starts " + " ".join(map(str, args.seed_starts))
        _merge(lambda results: results["teacher"].update(rows), command, "OMP_NUM_THREADS=1 python benchmarks/"
               "convergence.py teacher")
        return
    cfg = recipe_config(args.recipe, args.steps)
    names = args.weights or (["model"] + [f"ema-{float(r)!r}" for r in cfg["ema_rates"]])
    name = args.name or args.recipe
    row = {"recipe": args.recipe, "description": RECIPES[args.recipe][0], "steps": args.steps,
           "gm": run_gm(args.recipe, args.steps)}
    print(json.dumps({k: {s: round(v, 4) for s, v in c.items()} for k, c in row["gm"]["rmse"].items()}), flush=True)
    if not args.skip_digits:
        row["digits"] = run_digits(args.recipe, name, args.steps, _weights_every(names, args.steps), args.heldout,
                                   args.sweep_steps, args.sweep_sigma_rels, train_seed=args.train_seed)
    command = (f"OMP_NUM_THREADS=1 python benchmarks/convergence.py run {args.recipe} --steps {args.steps}"
               + (" --weights " + " ".join(args.weights) if args.weights else "")
               + (" --heldout " + " ".join(args.heldout) if args.heldout else "")
               + (" --sweep-steps " + " ".join(map(str, args.sweep_steps)) if args.sweep_steps else "")
               + (" --sweep-sigma-rels " + " ".join(map(str, args.sweep_sigma_rels))
                  if args.sweep_steps and args.sweep_sigma_rels != SWEEP_SIGMA_RELS else "")
               + (" --skip-digits" if args.skip_digits else "")
               + (f" --train-seed {args.train_seed}" if args.train_seed else "")
               + (f" --name {name}" if args.name else ""))
    _merge(lambda results: results["recipes"].__setitem__(name, row), command,
           f"OMP_NUM_THREADS=1 python benchmarks/convergence.py run {args.recipe} --steps {args.steps}")


if __name__ == "__main__":
    main()
