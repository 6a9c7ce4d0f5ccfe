"""DiT teachers (diffusers' DiTTransformer2DModel, e.g. facebook/DiT-XL-2-256): class-conditional
latent transformers with a learned variance and a null class (index = number of classes, DiT
pipeline's class_null) for classifier-free guidance; in train mode their label embedding drops
labels at random. The denoiser equals the x0 of DDPMScheduler.step from the transformer's output;
the all-zero label is the null class; the student copied from it is deterministic in train mode
while a bare train-mode DiT is refused with the reason; guidance uses the null class; and a DiT
pipeline folder (transformer/ + scheduler/) goes through distill -> sample -> export-diffusers ->
DiffusionPipeline."""

import copy
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from pid_fast import guided  # noqa: E402
from pid_fast.cli import main  # noqa: E402
from pid_fast.loss import PIDLoss  # noqa: E402
from pid_fast.loss.student import stochastic_parts  # noqa: E402
from pid_fast.models.diffusers_adapter import DiffusersDenoiser, DiffusersUNet  # noqa: E402
from pid_fast.train import load_student, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 5


def tiny_dit(size=8, channels=2):
    """A random DiTTransformer2DModel with DiT's defaults (learned sigma: out_channels = 2 x in,
    label dropout 0.1, so a null class at index CLASSES)."""
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=channels,
                                           out_channels=2 * channels, num_layers=2, sample_size=size, patch_size=2,
                                           num_embeds_ada_norm=CLASSES).eval()


def _one_hot(labels):
    return torch.nn.functional.one_hot(labels, CLASSES).float()


def test_the_dit_denoiser_equals_the_schedulers_x0_and_zero_labels_are_the_null_class():
    dit = tiny_dit()
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
    teacher = DiffusersDenoiser.from_scheduler(dit, scheduler)
    net = teacher.model
    assert (net.label_dim, net.null_class, net.out_channels, net.learned_variance) == (CLASSES, CLASSES, 2, True)
    gen = torch.Generator().manual_seed(1)
    x0, eps = 0.5 * torch.randn(3, 2, 8, 8, generator=gen), torch.randn(3, 2, 8, 8, generator=gen)
    classes = torch.tensor([0, 3, 4])
    worst = 0.0
    for t in [0, 10, 500, 999]:
        ab = scheduler.alphas_cumprod[t].double()
        x_t = scheduler.add_noise(x0, eps, torch.full((3,), t))
        sigma = ((1 - ab) / ab).sqrt().float()
        for labels, class_labels in ((_one_hot(classes), classes), (torch.zeros(3, CLASSES), torch.full((3,), CLASSES))):
            with torch.no_grad():
                d = teacher(x_t.double() / ab.sqrt(), sigma, labels)
                out = dit(x_t, torch.full((3,), t), class_labels=class_labels).sample
            ref = scheduler.step(out, t, x_t).pred_original_sample
            worst = max(worst, float((d - ref).abs().max() / ref.abs().max()))
    assert worst < 1e-5, worst


def test_a_dit_student_is_deterministic_in_train_mode_and_a_bare_one_is_refused_with_the_reason():
    dit = tiny_dit()
    teacher = DiffusersDenoiser.from_scheduler(copy.deepcopy(dit), diffusers.DDPMScheduler(variance_type="learned_range"))
    student = copy.deepcopy(teacher.model).train()
    assert student.training and stochastic_parts(student) == []
    x, t, labels = torch.randn(16, 2, 8, 8), torch.full((16,), 500.0), _one_hot(torch.arange(16) % CLASSES)
    torch.testing.assert_close(student(x, t, labels), student(x, t, labels), rtol=0, atol=0)

    pid = PIDLoss(teacher, N=20, sigma_min=teacher.sigma_min)
    noise, indices = torch.randn(4, 2, 8, 8) * 80.0, torch.randint(0, 20, (4,))
    bare = copy.deepcopy(dit).train().requires_grad_(True)  # its label embedding drops labels in train mode
    assert any("dropout_prob=0.1" in part for part in stochastic_parts(bare))
    with pytest.raises(ValueError, match="train-mode randomness.*dropout_prob=0.1.*eval mode"):
        pid(bare, noise, torch.arange(4) % CLASSES, indices=indices)
    bare.pos_embed.eval()  # (no effect: only the label embedding matters)
    for module in bare.modules():
        if hasattr(module, "token_drop"):
            module.eval()
    loss_bare = pid(bare, noise, torch.arange(4) % CLASSES, indices=indices)
    loss_wrapped = pid(student, noise, _one_hot(torch.arange(4) % CLASSES), indices=indices)
    torch.testing.assert_close(loss_bare, loss_wrapped, rtol=1e-6, atol=0)


def test_guidance_of_a_dit_uses_its_null_class():
    dit = tiny_dit()
    teacher = DiffusersDenoiser.from_scheduler(dit, diffusers.DDPMScheduler(variance_type="learned_range"))
    cfg = guided(teacher, teacher, 3.0, guide_labels="zeros")
    x, sigma, labels = torch.randn(4, 2, 8, 8) * 2.0, torch.full((4,), 2.0), _one_hot(torch.tensor([0, 1, 2, 4]))
    with torch.no_grad():
        cond, null = teacher(x, sigma, labels), teacher(x, sigma, torch.zeros(4, CLASSES))
        torch.testing.assert_close(cfg(x, sigma, labels), null + 3.0 * (cond - null), rtol=1e-5, atol=1e-6)
        assert (cond - null).abs().max() > 1e-4  # the null class is another input than class 0..4


def test_a_unet_without_a_null_class_refuses_the_all_zero_label():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=3)
    teacher = DiffusersDenoiser.from_scheduler(unet, diffusers.DDPMScheduler())
    assert teacher.model.null_class is None
    with pytest.raises(ValueError, match="class_labels: an all-zero label.*null_label"):
        teacher(torch.randn(2, 1, 8, 8), torch.ones(2), torch.zeros(2, 3))


def test_a_dit_pipeline_folder_distils_samples_and_exports(tmp_path):
    """transformer/ + scheduler/ as DiTPipeline.save_pretrained writes them (no VAE: latents), with
    classifier-free guidance on its null class; the exported one-step pipeline gives `pid-fast
    sample`'s latents."""
    folder = tmp_path / "dit"
    tiny_dit().save_pretrained(folder / "transformer")
    diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False).save_pretrained(folder / "scheduler")
    run, out = tmp_path / "run", tmp_path / "one-step"
    cfg = {"device": "cpu", "teacher": {"kind": "diffusers", "path": str(folder),
                                        "guidance": {"scale": 2.0, "guide": "unconditional",
                                                     "null_label": None}},
           "loss": {"N": 20}, "batch_size": 4, "total_steps": 2, "log_every": 1, "checkpoint_every": 2,
           "keep_checkpoints": 0, "snapshot_every": 0, "progress": False, "ema_rates": [0.5],
           "optimizer": {"lr": 1e-3}}
    train(cfg, run)
    net, meta = load_student(run, weights="model")
    assert isinstance(net, DiffusersUNet) and type(net.unet).__name__ == "DiTTransformer2DModel"
    assert list(meta["shape"]) == [2, 8, 8] and net.label_dim == CLASSES
    runner = CliRunner()
    res = runner.invoke(main, ["sample", str(run), str(tmp_path / "s.npz"), "--num", "4", "--weights", "model"])
    assert res.exit_code == 0, res.output
    samples = np.load(tmp_path / "s.npz")
    assert samples["x"].shape == (4, 2, 8, 8) and np.isfinite(samples["x"]).all()
    assert np.abs(samples["x"]).max() > 1.0  # latents: not clamped to an image range

    # the guided teacher's latents from the same seeds, not clamped either
    res = runner.invoke(main, ["sample", "--teacher", str(run / "config.json"), str(tmp_path / "t.npz"), "--num", "4",
                               "--steps", "4"])
    assert res.exit_code == 0, res.output
    assert np.abs(np.load(tmp_path / "t.npz")["x"]).max() > 1.0
    res = runner.invoke(main, ["export-diffusers", str(run), str(out), "--weights", "model"])
    assert res.exit_code == 0, res.output
    assert os.path.isdir(out / "unet")
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.unet).__name__ == "DiTTransformer2DModel"

    # --vae decodes a diffusers student's latents as its pipeline would: vae.decode(x / scaling_factor)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=2, norm_num_groups=4, sample_size=16, scaling_factor=0.25)
    vae.save_pretrained(folder / "vae")
    res = runner.invoke(main, ["sample", str(run), str(tmp_path / "img.npz"), "--num", "4", "--weights", "model",
                               "--vae", str(folder / "vae")])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        expected = vae.decode(torch.as_tensor(samples["x"]) / 0.25).sample.clamp(-1, 1)
    decoded = np.load(tmp_path / "img.npz")["x"]
    assert decoded.shape == (4, 3, 16, 16)
    np.testing.assert_allclose(decoded, expected.numpy(), atol=1e-5)
    x = pipe(generator=[torch.Generator().manual_seed(s) for s in range(4)],
             class_labels=torch.as_tensor(samples["labels"]), output_type="latent").images
    np.testing.assert_allclose(x.numpy(), samples["x"], atol=1e-5)


def test_the_configs_null_label_may_name_dits_null_class():
    from pid_fast.train.builders import guided_teacher

    teacher = DiffusersDenoiser.from_scheduler(tiny_dit(), diffusers.DDPMScheduler(variance_type="learned_range"))
    x, sigma, labels = torch.randn(2, 2, 8, 8), torch.full((2,), 1.5), _one_hot(torch.tensor([1, 3]))
    cpu = torch.device("cpu")
    outs = []
    for null in (None, CLASSES):  # "no class" and DiT's own null index (its pipeline's class_null)
        g = guided_teacher(teacher, {"scale": 2.0, "guide": "unconditional", "null_label": null}, cpu)
        with torch.no_grad():
            outs.append(g(x, sigma, labels))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="null_label'\\]: 7 is not a class index of the teacher's 5 classes nor its "
                                         "null class 5"):
        guided_teacher(teacher, {"scale": 2.0, "guide": "unconditional", "null_label": 7}, cpu)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_teacher_samples_of_a_dit_equal_diffusers_loop(solver):
    """grid="scheduler" against diffusers' own loop (pid_fast's diffusers_loop: one timestep per
    sample, the prediction half of the output), for classes and for the null class."""
    from pid_fast.models.diffusers_adapter import diffusers_loop
    from pid_fast.sampling import ode_sample

    dit = tiny_dit()
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
    teacher = DiffusersDenoiser.from_scheduler(dit, scheduler)
    z = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([0, 1, 2, 3, 4])
    for class_labels, labels in ((classes, _one_hot(classes)), (torch.full((5,), CLASSES), torch.zeros(5, CLASSES))):
        with torch.no_grad():
            reference = diffusers_loop(dit, scheduler.config, z, solver=solver, num_steps=6, class_labels=class_labels)
            mine = ode_sample(teacher, z, labels, solver=solver, num_steps=6, grid="scheduler")
        assert float((mine - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()) < 1e-5


def test_a_guided_dit_run_resumes_exactly(tmp_path):
    """A run of a guided DiT teacher stopped at its step-2 checkpoint and resumed ends with the
    uninterrupted run's weights and EMA (the rebuilt student keeps its label embedding in eval mode)."""
    folder = tmp_path / "dit"
    tiny_dit().save_pretrained(folder / "transformer")
    diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False).save_pretrained(folder / "scheduler")

    def cfg(steps):
        return {"device": "cpu", "teacher": {"kind": "diffusers", "path": str(folder),
                                             "guidance": {"scale": 2.0, "guide": "unconditional"}},
                "loss": {"N": 20}, "batch_size": 4, "total_steps": steps, "log_every": 1, "checkpoint_every": 2,
                "keep_checkpoints": 0, "snapshot_every": 0, "progress": False, "ema_rates": [0.5],
                "optimizer": {"lr": 1e-3}}

    train(cfg(4), tmp_path / "full")
    train(cfg(2), tmp_path / "resumed")
    train(cfg(4), tmp_path / "resumed", resume=True)
    for weights in ("model", "ema-0.5"):
        full, _ = load_student(tmp_path / "full", weights=weights)
        resumed, _ = load_student(tmp_path / "resumed", weights=weights)
        for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), (weights, name)
