"""A diffusers user's path through the trainer and the CLI (issue 26):

1. the student's image shape, channels and label width are checked against the teacher's before
   any step (and taken from it with student.init 'teacher' or a diffusers teacher);
2. the PID sigma range defaults to the teacher's own, is printed and stored in the run, and a range
   outside the teacher's is refused unless loss.allow_extrapolation (then one warning);
3. `pid-fast sample --teacher` gives the samples diffusers' own loops give from the same noise;
4. an EDM-scheduler teacher (EDMEulerScheduler) trains from a folder;
5. `export-diffusers` writes a folder DiffusionPipeline.from_pretrained loads and samples in one
   step, equal to `pid-fast sample`; the README's snippet runs on it.
"""

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from test_diffusers_teacher import _config, _error, save_teacher  # noqa: E402

from pid_fast.cli import main  # noqa: E402
from pid_fast.demo.digits import DEFAULT_FEATURES  # noqa: E402
from pid_fast.sampling import seeded_latents  # noqa: E402
from pid_fast.train import build_student, build_teacher, load_student, resolve_config, train  # noqa: E402
from pid_fast.train.builders import resolve_sigma_range  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
# DDPM's linear schedule: the trained sigmas of timesteps 0 and 999
DDPM_SIGMA_MIN, DDPM_SIGMA_MAX = 0.0100013, 157.4073
TINY_EDM = {"name": "tiny-ddpmpp", "model_channels": 8, "channel_mult": [1], "attn_resolutions": []}
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")


def _student(cfg):
    teacher, teacher_net = build_teacher(cfg["teacher"], CPU)
    return build_student(cfg["student"], teacher, teacher_net, CPU)


# ----------------------------------------------------------------------------------------
# 1. shapes


def test_a_named_student_takes_a_diffusers_teachers_shape(tmp_path):
    """configs/tiny-cpu.json's 8x8 3-channel tiny-ddpmpp student with a 16x16 1-channel diffusers
    teacher: the student is built for the teacher's images (it was trained on 8x8 inputs)."""
    folder = save_teacher(tmp_path / "t", num_class_embeds=3)
    cfg = resolve_config(_config(folder, student={"init": "random", "network": TINY_EDM}))
    _, net_cfg = _student(cfg)
    assert (net_cfg["img_resolution"], net_cfg["in_channels"], net_cfg["out_channels"], net_cfg["label_dim"]) == \
        (16, 1, 1, 3)
    cfg["student"]["network"] = {**TINY_EDM, "img_resolution": 8}  # set explicitly: checked, not replaced
    with pytest.raises(ValueError, match=r"student.network'\] has img_resolution=8 but the teacher has "
                                         r"img_resolution=16"):
        _student(cfg)
    cfg["student"]["network"] = {**TINY_EDM, "label_dim": 0}
    with pytest.raises(ValueError, match=r"has label_dim=0 but the teacher has label_dim=3"):
        _student(cfg)


def test_an_edm_teachers_shape_is_checked_and_taken_with_init_teacher():
    teacher = {"kind": "network", "network": {**TINY_EDM, "img_resolution": 16, "in_channels": 1,
                                              "out_channels": 1}}
    cfg = resolve_config({"device": "cpu", "teacher": teacher, "student": {"init": "random", "network": TINY_EDM}})
    with pytest.raises(ValueError, match=r"has img_resolution=8 but the teacher has img_resolution=16"):
        _student(cfg)
    cfg["student"]["network"] = {**TINY_EDM, "img_resolution": 16}
    with pytest.raises(ValueError, match=r"has in_channels=3 but the teacher has in_channels=1"):
        _student(cfg)
    cfg["student"].update(init="teacher", network=TINY_EDM)  # a copy of the teacher: its shape
    net, net_cfg = _student(cfg)
    assert (net_cfg["img_resolution"], net_cfg["in_channels"]) == (16, 1)
    assert net(torch.zeros(2, 1, 16, 16), torch.zeros(2), None).shape == (2, 1, 16, 16)


def test_distill_stops_before_any_step_on_a_shape_mismatch(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_config(save_teacher(tmp_path / "t"), student={
        "init": "random", "network": {**TINY_EDM, "img_resolution": 8, "in_channels": 1, "out_channels": 1}})))
    res = CliRunner().invoke(main, ["distill", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                                    "--threads", "1"])
    _error(res, "img_resolution=8 but the teacher has img_resolution=16")
    assert not (tmp_path / "run" / "log.jsonl").exists()


# ----------------------------------------------------------------------------------------
# 2. the sigma range


def test_the_sigma_range_defaults_to_the_teachers_and_is_stored(tmp_path):
    folder = save_teacher(tmp_path / "t")
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_config(folder, loss={"N": 20}, total_steps=2)))
    assert resolve_config(json.loads(config.read_text()))["loss"]["sigma_min"] is None  # known once loaded
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["distill", "--config", str(config), "--run-dir", str(run), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "PID sigma range: 0.0100013 .. 157.407 (the teacher's: 0.0100013 .. 157.407" in res.output
    stored = json.loads((run / "config.json").read_text())["loss"]
    assert stored["sigma_min"] == pytest.approx(DDPM_SIGMA_MIN, rel=1e-5)
    assert stored["sigma_max"] == pytest.approx(DDPM_SIGMA_MAX, rel=1e-5)
    _, meta = load_student(run, weights="model")
    assert (meta["sigma_min"], meta["sigma_max"]) == (stored["sigma_min"], stored["sigma_max"])
    # A resume with the range still null keeps the run's.
    res = CliRunner().invoke(main, ["distill", "--config", str(config), "--run-dir", str(run), "--threads", "1",
                                    "--resume", "--total-steps", "3"])
    assert res.exit_code == 0, res.output
    assert "PID sigma range: 0.0100013 .. 157.407" in res.output and load_student(run)[1]["step"] == 3


def test_a_range_outside_the_teachers_is_refused_unless_allowed(tmp_path):
    folder = save_teacher(tmp_path / "t")
    with pytest.raises(ValueError, match=r"loss.sigma_min=0.002 is below the teacher's smallest sigma 0.0100013 "
                                         r"\(the teacher's range is \[0.0100013, 157.407\].*allow_extrapolation"):
        train(_config(folder, loss={"N": 20, "sigma_min": 0.002}), tmp_path / "r1")
    with pytest.raises(ValueError, match=r"loss.sigma_max=200 is above the teacher's largest sigma 157.407"):
        train(_config(folder, loss={"N": 20, "sigma_max": 200.0}), tmp_path / "r2")
    assert not (tmp_path / "r1" / "log.jsonl").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train(_config(folder, loss={"N": 20, "sigma_min": 0.002, "allow_extrapolation": True},
                            total_steps=2), tmp_path / "r3")
    assert out["step"] == 2
    assert len([w for w in caught if "allow_extrapolation" in str(w.message)]) == 1
    assert json.loads((tmp_path / "r3" / "config.json").read_text())["loss"]["sigma_min"] == 0.002


@pytest.mark.parametrize("teacher, expected", [
    ({"kind": "network", "network": TINY_EDM, "precond": "edm"}, (0.002, 80.0)),
    ({"kind": "network", "network": TINY_EDM, "precond": "ve"}, (0.02, 80.0)),  # VE declares [0.02, 100]
    ({"kind": "gaussian"}, (0.002, 80.0)),
])
def test_other_teachers_default_to_edms_range_within_theirs(teacher, expected):
    student = {"init": "random", "network": TINY_EDM} if teacher["kind"] == "gaussian" else {}
    loss = resolve_config({"teacher": teacher, "student": student})["loss"]
    assert (loss["sigma_min"], loss["sigma_max"]) == expected
    if teacher.get("precond") == "ve":
        cfg = resolve_config({"teacher": teacher, "loss": {"sigma_min": 0.002}})
        teacher_object, _ = build_teacher(cfg["teacher"], CPU)
        with pytest.raises(ValueError, match="loss.sigma_min=0.002 is below the teacher's smallest sigma 0.02"):
            resolve_sigma_range(cfg["loss"], teacher_object)
    with pytest.raises(ValueError, match=r"config\['loss.allow_extrapolation'\] must be a bool, got 'yes'"):
        resolve_config({"teacher": teacher, "student": student, "loss": {"allow_extrapolation": "yes"}})


# ----------------------------------------------------------------------------------------
# 3. teacher samples from the CLI


@torch.no_grad()
def _diffusers_loop(folder, scheduler_class, z, steps, **unet_kwargs):
    unet = diffusers.UNet2DModel.from_pretrained(os.path.join(folder, "unet"))
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(os.path.join(folder, "scheduler"))
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t, **unet_kwargs).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler, scheduler_class", [("heun", "HeunDiscreteScheduler"),
                                                      ("euler", "EulerDiscreteScheduler")])
def test_sample_teacher_gives_diffusers_samples(tmp_path, sampler, scheduler_class):
    folder = save_teacher(tmp_path / "t", prediction_type="v_prediction", num_class_embeds=3)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_config(folder)))
    runner = CliRunner()
    outs = []
    for source in (folder, str(config)):  # a folder, or a trainer config naming it
        out = tmp_path / f"{len(outs)}.npz"
        res = runner.invoke(main, ["sample", "--teacher", source, str(out), "--num", "3", "--seed-start", "5",
                                   "--sampler", sampler, "--steps", "4", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert f"({sampler}, 4 steps" in res.output and "grid scheduler" in res.output
        outs.append(np.load(out))
    np.testing.assert_array_equal(outs[0]["x"], outs[1]["x"])
    z, labels = seeded_latents(range(5, 8), [1, 16, 16], 3)
    assert outs[0]["labels"].tolist() == labels.argmax(1).tolist()
    reference = _diffusers_loop(folder, scheduler_class, z, 4, class_labels=labels.argmax(1)).clamp(-1, 1)
    err = np.sqrt(((outs[0]["x"] - reference.numpy()) ** 2).mean() / (reference.numpy() ** 2).mean())
    assert err < 1e-5
    # --grid karras is EDM's grid: other samples.
    res = runner.invoke(main, ["sample", "--teacher", folder, str(tmp_path / "k.npz"), "--num", "3", "--seed-start",
                               "5", "--sampler", sampler, "--steps", "4", "--grid", "karras"])
    assert res.exit_code == 0, res.output
    assert np.abs(np.load(tmp_path / "k.npz")["x"] - outs[0]["x"]).max() > 1e-2


def test_sample_teacher_errors(tmp_path):
    runner = CliRunner()
    _error(runner.invoke(main, ["sample", str(tmp_path / "x.npz")]), "expected CHECKPOINT OUT, got 1 path(s)")
    folder = save_teacher(tmp_path / "t")
    _error(runner.invoke(main, ["sample", "--teacher", folder, "a", "b.npz"]), "expected OUT (with --teacher)")
    _error(runner.invoke(main, ["sample", folder, str(tmp_path / "x.npz"), "--steps", "3"]),
           "--steps applies to teacher samples only")
    config = tmp_path / "g.json"
    config.write_text(json.dumps({"teacher": {"kind": "gaussian"}, "student": {"init": "random",
                                                                               "network": TINY_EDM}}))
    _error(runner.invoke(main, ["sample", "--teacher", str(config), str(tmp_path / "x.npz")]),
           "--teacher: the 'gaussian' teacher", "has no network")
    # An EDM-style teacher from a config samples on the Karras grid.
    config.write_text(json.dumps({"teacher": {"kind": "network", "network": TINY_EDM}}))
    res = runner.invoke(main, ["sample", "--teacher", str(config), str(tmp_path / "e.npz"), "--num", "2",
                               "--steps", "2", "--sampler", "euler"])
    assert res.exit_code == 0 and "grid karras" in res.output, res.output
    assert np.load(tmp_path / "e.npz")["x"].shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------------------
# 4. an EDM-scheduler teacher through the trainer


def test_an_edm_scheduler_teacher_trains_from_a_folder(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    folder = tmp_path / "edm"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.EDMEulerScheduler(
        sigma_data=0.6, prediction_type="v_prediction", sigma_max=60.0)).save_pretrained(folder)
    out = train(_config(str(folder), loss={"N": 20}, total_steps=2), tmp_path / "run")
    assert out["step"] == 2 and np.isfinite(out["loss"])
    net, meta = load_student(tmp_path / "run", weights="model")
    assert (meta["sigma_min"], meta["sigma_max"], meta["sigma_data"]) == (0.002, 60.0, 0.6)
    assert meta["noise_rule"] == {"precond": "edm"}
    res = CliRunner().invoke(main, ["export-diffusers", str(tmp_path / "run"), str(tmp_path / "out"),
                                    "--weights", "model"])
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "out" / "pid_one_step.json").read_text())
    assert settings["timestep"] == pytest.approx(np.log(0.002) / 4, rel=1e-6)


# ----------------------------------------------------------------------------------------
# 5. export as a diffusers pipeline


def _export(tmp_path, num_class_embeds=None, unet=None):
    """A 2-step run of a diffusers teacher, its `sample` and its export."""
    folder = save_teacher(tmp_path / "t", num_class_embeds=num_class_embeds, unet=unet)
    run, out = tmp_path / "run", tmp_path / "one-step"
    train(_config(folder, loss={"N": 20}, total_steps=2), run)
    runner = CliRunner()
    res = runner.invoke(main, ["sample", str(run), str(tmp_path / "s.npz"), "--num", "4", "--weights", "model"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["export-diffusers", str(run), str(out), "--weights", "model"])
    assert res.exit_code == 0, res.output
    assert "DiffusionPipeline.from_pretrained" in res.output
    return out, np.load(tmp_path / "s.npz"), folder, run


def test_the_exported_folder_is_a_one_step_diffusers_pipeline(tmp_path):
    out, samples, _, _ = _export(tmp_path, num_class_embeds=3)
    assert {"model_index.json", "pipeline_pid_one_step.py", "unet", "pid_one_step.json"} <= set(os.listdir(out))
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe).__name__ == "PIDOneStepPipeline"
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]  # pid-fast sample's seeds 0..3
    x = pipe(generator=generators, class_labels=torch.as_tensor(samples["labels"]), output_type="latent").images
    np.testing.assert_allclose(x.numpy(), samples["x"], atol=1e-5)
    images = pipe(batch_size=2, class_labels=torch.tensor([0, 1])).images
    assert len(images) == 2 and images[0].size == (16, 16)
    with pytest.raises(ValueError, match="class_labels: this student is class-conditional"):
        pipe(batch_size=1)
    with pytest.raises(ValueError, match="num_inference_steps: a PID student samples in one step"):
        pipe(batch_size=1, class_labels=torch.tensor([0]), num_inference_steps=4)
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers' own rule for code in a folder
        diffusers.DiffusionPipeline.from_pretrained(out)


def test_a_learned_variance_teacher_trains_samples_and_exports(tmp_path):
    """A UNet with out_channels = 2 in_channels ([prediction, variance]): the student copied from it
    keeps the architecture, takes and returns 1-channel images, and its exported pipeline gives
    `pid-fast sample`'s images."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    out, samples, folder, run = _export(tmp_path, unet=unet)
    net, meta = load_student(run, weights="model")
    assert list(meta["shape"]) == [1, 16, 16] and net.unet.config.out_channels == 2 and net.learned_variance
    assert samples["x"].shape == (4, 1, 16, 16)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    x = pipe(generator=[torch.Generator().manual_seed(seed) for seed in range(4)], output_type="latent").images
    np.testing.assert_allclose(x.numpy(), samples["x"], atol=1e-5)
    res = CliRunner().invoke(main, ["sample", "--teacher", folder, str(tmp_path / "t.npz"), "--num", "2",
                                    "--steps", "3"])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "t.npz")["x"].shape == (2, 1, 16, 16)


def test_the_readme_export_snippet_runs(tmp_path):
    """The README's export snippet (the python block after its marker) with OUT an exported
    unconditional student: its images are `pid-fast sample`'s."""
    out, samples, folder, run = _export(tmp_path)
    text = open(README).read()
    match = re.search(r"<!-- export-diffusers snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README: no python block after <!-- export-diffusers snippet -->"
    code = match.group(1).replace('"OUT"', repr(str(out)))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    images = scope["images"]
    assert len(images) == 4 and images[0].size == (16, 16)
    pixels = np.stack([np.asarray(image, dtype=np.float64) for image in images]) / 255 * 2 - 1
    assert np.abs(pixels - samples["x"][:, 0]).max() <= 1.01 / 255 * 2  # PIL's uint8 rounding
    # The distance to the teacher: the run's samples against the teacher's (diffusers') samples.
    if os.path.isfile(DEFAULT_FEATURES):
        runner = CliRunner()
        res = runner.invoke(main, ["sample", "--teacher", folder, str(tmp_path / "teacher.npz"), "--num", "12",
                                   "--steps", "3"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(main, ["fid", str(run), "--features", "digits", "--ref", str(tmp_path / "teacher.npz"),
                                   "--num", "12", "--batch", "12", "--weights", "model"])
        assert res.exit_code == 0, res.output
        assert np.isfinite(float(res.output.strip().split()[-1]))
