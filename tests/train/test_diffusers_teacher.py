"""A diffusers teacher through the trainer and the CLI: the folder layouts it loads from, the
errors for what it cannot load, the student built from it, and `pid-fast distill` -> `sample`
-> `fid --features digits` -> `export-diffusers`, whose folder diffusers loads back as a
one-step model giving the same images as `pid-fast sample`."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from pid_fast.cli import main  # noqa: E402
from pid_fast.demo.digits import DEFAULT_FEATURES  # noqa: E402
from pid_fast.io.diffusers_io import load_diffusers_teacher, load_one_step, one_step_sample  # noqa: E402
from pid_fast.models.diffusers_adapter import DiffusersDenoiser, DiffusersUNet  # noqa: E402
from pid_fast.sampling import seeded_latents  # noqa: E402
from pid_fast.train import build_student, build_teacher, load_student, resolve_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def save_teacher(folder, layout="pipeline", prediction_type="epsilon", num_class_embeds=None, unet=None):
    """A tiny random UNet2DModel on digits-shaped images (1 x 16 x 16) and a DDPM scheduler,
    saved with save_pretrained: folder/unet + folder/scheduler, or both in one folder."""
    if unet is None:
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4, num_class_embeds=num_class_embeds)
    scheduler = diffusers.DDPMScheduler(prediction_type=prediction_type)
    unet_dir = os.path.join(folder, "unet") if layout == "pipeline" else folder
    unet.save_pretrained(unet_dir)
    scheduler.save_pretrained(os.path.join(folder, "scheduler") if layout == "pipeline" else folder)
    return str(folder)


def _config(teacher_path, **over):
    cfg = {"device": "cpu", "teacher": {"kind": "diffusers", "path": str(teacher_path)},
           "loss": {"N": 50, "sigma_min": 0.01, "sigma_max": 80.0}, "batch_size": 4, "total_steps": 4,
           "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 0, "snapshot_every": 0, "progress": False,
           "ema_rates": [0.5, 0.9], "optimizer": {"lr": 1e-3}}
    cfg.update(over)
    return cfg


def _error(result, *needles):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_teacher_loads_from_either_folder_layout(tmp_path, layout):
    folder = save_teacher(tmp_path / "t", layout, prediction_type="v_prediction")
    teacher = load_diffusers_teacher(folder)
    assert isinstance(teacher, DiffusersDenoiser) and teacher.prediction_type == "v_prediction"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.sigma_min == pytest.approx(0.0100013, rel=1e-5) and teacher.sigma_max == pytest.approx(157.4, rel=1e-3)
    # The weights are the saved ones, and overrides apply.
    saved = diffusers.UNet2DModel.from_pretrained(os.path.join(folder, "unet") if layout == "pipeline" else folder)
    for key, value in saved.state_dict().items():
        assert torch.equal(teacher.model.unet.state_dict()[key], value)
    other = load_diffusers_teacher(folder, prediction_type="sample", timestep_rounding="nearest")
    assert (other.prediction_type, other.timestep_rounding) == ("sample", "nearest")


def test_student_is_the_teachers_architecture_and_weights(tmp_path):
    cfg = resolve_config(_config(save_teacher(tmp_path / "t", num_class_embeds=10)))
    teacher, teacher_net = build_teacher(cfg["teacher"], torch.device("cpu"))
    assert teacher_net["model_type"] == "diffusers" and teacher_net["label_dim"] == 10
    student, net_cfg = build_student(cfg["student"], teacher, teacher_net, torch.device("cpu"))
    assert isinstance(student, DiffusersUNet) and student.training and net_cfg["dropout"] == 0.0
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(student.state_dict()[key], value)
    cfg["student"]["init"] = "random"
    fresh, _ = build_student(cfg["student"], teacher, teacher_net, torch.device("cpu"))
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in teacher.model.state_dict().items())


def test_distill_sample_fid_and_export_end_to_end(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(save_teacher(tmp_path / "teacher"))))
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(main, ["distill", "--config", str(config), "--run-dir", str(run), "--threads", "1"])
    assert res.exit_code == 0, res.output
    net, meta = load_student(run, weights="model")
    assert isinstance(net, DiffusersUNet) and meta["step"] == 4
    assert meta["noise_rule"]["precond"] == "diffusers" and len(meta["noise_rule"]["alphas_cumprod"]) == 1000
    assert meta["shape"] == [1, 16, 16] and meta["network"]["model_type"] == "diffusers"
    losses = [json.loads(line)["loss"] for line in open(run / "log.jsonl") if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))

    res = runner.invoke(main, ["sample", str(run), str(tmp_path / "s.npz"), "--num", "6", "--weights", "model"])
    assert res.exit_code == 0, res.output
    x = np.load(tmp_path / "s.npz")["x"]
    assert x.shape == (6, 1, 16, 16) and np.abs(x).max() <= 1

    if os.path.isfile(DEFAULT_FEATURES):  # the bundled digits feature network scores 1 x 16 x 16 images
        res = runner.invoke(main, ["fid", str(run), "--features", "digits", "--num", "20", "--batch", "10"])
        assert res.exit_code == 0, res.output
        assert np.isfinite(float(res.output.strip().split()[-1])) and "digits FD vs" in res.output

    out = tmp_path / "one-step"
    res = runner.invoke(main, ["export-diffusers", str(run), str(out), "--weights", "model"])
    assert res.exit_code == 0, res.output
    # What a diffusers user does (the recipe of pid_fast/io/diffusers_io.py), against `pid-fast sample`.
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet")
    settings = json.loads((out / "pid_one_step.json").read_text())
    z, _ = seeded_latents(range(6), settings["shape"])
    with torch.no_grad():
        t = torch.tensor([settings["timestep"]])
        mine = settings["noise_weight"] * z + settings["output_weight"] * unet(settings["input_scale"] * z, t).sample
    np.testing.assert_allclose(mine.clamp(-1, 1).numpy(), x, atol=1e-5)
    loaded, settings2 = load_one_step(out)
    np.testing.assert_allclose(one_step_sample(loaded, settings2, z).numpy(), x, atol=1e-5)
    _error(runner.invoke(main, ["export-diffusers", str(run), str(out)]), "exists; pass --overwrite")


def test_export_refuses_a_non_diffusers_student(tmp_path):
    from pid_fast.train import train

    run = tmp_path / "run"
    train({"device": "cpu", "teacher": {"kind": "gaussian"}, "student": {"init": "random", "network": {
        "name": "tiny-ddpmpp", "model_channels": 8, "channel_mult": [1], "attn_resolutions": [], "img_resolution": 8}},
        "batch_size": 2, "total_steps": 1, "snapshot_every": 0, "progress": False}, run)
    _error(CliRunner().invoke(main, ["export-diffusers", str(run), str(tmp_path / "out")]), "not a diffusers UNet")


def test_folders_that_cannot_be_loaded_name_the_argument(tmp_path):
    runner = CliRunner()

    def distill(path, **teacher):
        config = tmp_path / "c.json"
        config.write_text(json.dumps(_config(path, teacher={"kind": "diffusers", "path": str(path), **teacher})))
        return runner.invoke(main, ["distill", "--config", str(config), "--run-dir", str(tmp_path / "run"),
                                    "--threads", "1"])

    _error(distill(tmp_path / "absent"), "teacher.path: no such folder")
    (tmp_path / "empty").mkdir()
    _error(distill(tmp_path / "empty"), "teacher.path", "is not a diffusers model folder")
    folder = save_teacher(tmp_path / "flow")
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(os.path.join(folder, "scheduler"))
    _error(distill(folder), "teacher.scheduler: unsupported scheduler 'FlowMatchEulerDiscreteScheduler'")
    _error(distill(folder, scheduler=str(tmp_path / "nowhere")), "teacher.scheduler: no scheduler_config.json")
    folder = save_teacher(tmp_path / "bad-type")
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    cfg = json.load(open(path))
    json.dump(dict(cfg, prediction_type="flow_prediction"), open(path, "w"))
    _error(distill(folder), "teacher.path: prediction_type must be one of", "flow_prediction")
    _error(distill(folder, timestep_rounding="floor"), "config['teacher.timestep_rounding'] must be one of")
    _error(distill(folder, key="ema"), "unknown key(s) ['teacher.key'] for teacher kind 'diffusers'")
    torch.manual_seed(0)
    cross = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4)
    # a cross-attention UNet without a text encoder: a text-to-image folder lacking its parts (tests/text)
    _error(distill(save_teacher(tmp_path / "cross", unet=cross)), "lacks text_encoder/, tokenizer/, vae/",
           "examples/diffusers_loop.py")


def test_missing_diffusers_is_a_clear_error(tmp_path, monkeypatch):
    folder = save_teacher(tmp_path / "t")
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_config(folder)))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ImportError, match=r"teacher.path \(a diffusers teacher\) needs diffusers .*pid_fast\[diffusers\]"):
        load_diffusers_teacher(folder)
    res = CliRunner().invoke(main, ["distill", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    _error(res, "needs diffusers (not installed): pip install 'pid_fast[diffusers]'")


def test_the_example_config_trains_once_its_path_is_filled_in(tmp_path):
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                           "diffusers-ddpm-cifar10.json")
    res = CliRunner().invoke(main, [
        "distill", "--config", example, "--run-dir", str(tmp_path / "run"), "--threads", "1", "--device", "cpu",
        "--set", f"teacher.path={save_teacher(tmp_path / 'teacher')}", "--set", "loss.norm=l2",
        "--batch-size", "2", "--total-steps", "1", "--snapshot-every", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert load_student(tmp_path / "run")[1]["sigma_min"] == 0.01


@pytest.mark.parametrize("mode", ["fp16-mixed", "bf16-mixed"])
def test_mixed_precision_keeps_the_diffusers_time_path_in_fp32(tmp_path, mode):
    """The mixed modes' fp32 islands find a diffusers UNet's time embedding, its resnets'
    time_emb_proj and its output head, and a class-conditional student trains a step."""
    from pid_fast.models.precision import FP32Forward
    from pid_fast.train import train

    folder = save_teacher(tmp_path / "t", num_class_embeds=3)
    out = train(_config(folder, precision=mode, total_steps=1), tmp_path / "run")
    assert out["step"] == 1 and out["loss"] == out["loss"]
    cfg = resolve_config(_config(folder, precision=mode))
    teacher, teacher_net = build_teacher(cfg["teacher"], torch.device("cpu"))
    student, _ = build_student(cfg["student"], teacher, teacher_net, torch.device("cpu"))
    from pid_fast.models.precision import keep_fp32

    keep_fp32(student)
    islands = {name for name, m in student.named_modules() if isinstance(m.__dict__.get("forward"), FP32Forward)}
    assert any(n.endswith("time_embedding") for n in islands) and any(n.endswith("class_embedding") for n in islands)
    assert any(n.endswith("time_emb_proj") for n in islands) and any(n.endswith("conv_out") for n in islands)


def test_threads_are_timed_on_a_class_conditional_student(tmp_path):
    from pid_fast.train.threads import pick_threads_for_config

    cfg = resolve_config(_config(save_teacher(tmp_path / "t", num_class_embeds=3)))
    best, timings = pick_threads_for_config(cfg)
    assert best in timings and all(t > 0 for t in timings.values())
