"""The diffusers adapter: a diffusers UNet + its schedule as a pid_fast denoiser D(x, sigma, labels).

D must equal the x0 the scheduler itself predicts at every trained timestep (each prediction
type); sigmas between trained steps go to the fractional timestep (or the nearest one); the
teacher's Heun sampling runs through it; PID lowers the loss of a student copied from it."""

import copy
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pid_fast.loss import PIDLoss  # noqa: E402
from pid_fast.models.diffusers_adapter import (DiffusersDenoiser, DiffusersUNet, SigmaToTimestep,  # noqa: E402
                                               build_diffusers_network, diffusers_noise_labels)
from pid_fast.sampling import heun_sample, karras_sigmas  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TIMESTEPS = [0, 1, 7, 100, 500, 998, 999]


def tiny_unet(**over):
    """A ~40k-parameter UNet2DModel on 1 x 8 x 8 images (random weights, fixed seed)."""
    kw = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
              norm_num_groups=4)
    kw.update(over)
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**kw).eval()


def tiny_cross_attention_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4).eval()


def _scheduler_x0(scheduler, unet, x_t, t, **unet_kwargs):
    """The x0 the scheduler predicts from the UNet's output at timestep t (its own formula)."""
    with torch.no_grad():
        out = unet(x_t, torch.full((x_t.shape[0],), t), **unet_kwargs).sample
        return scheduler.step(out, t, x_t).pred_original_sample


@pytest.mark.parametrize("scheduler_class", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_equals_the_schedulers_x0(scheduler_class, prediction_type):
    unet = tiny_unet()
    scheduler = getattr(diffusers, scheduler_class)(prediction_type=prediction_type, clip_sample=False,
                                                    beta_schedule="scaled_linear" if scheduler_class == "DDIMScheduler"
                                                    else "linear")
    if scheduler_class == "DDIMScheduler":
        scheduler.set_timesteps(1000)
    teacher = DiffusersDenoiser.from_scheduler(unet, scheduler)
    assert teacher.prediction_type == prediction_type and teacher.timestep_rounding == "interpolate"
    gen = torch.Generator().manual_seed(1)
    x0 = 0.5 * torch.randn(3, 1, 8, 8, generator=gen)
    eps = torch.randn(3, 1, 8, 8, generator=gen)
    worst = 0.0
    for t in TIMESTEPS:
        ab = scheduler.alphas_cumprod[t].double()
        x_t = scheduler.add_noise(x0, eps, torch.full((3,), t))
        sigma = ((1 - ab) / ab).sqrt()
        with torch.no_grad():
            d = teacher(x_t.double() / ab.sqrt(), sigma.float())  # x = x_t / sqrt(ab): the VE sample
        ref = _scheduler_x0(scheduler, unet, x_t, t)
        worst = max(worst, float((d - ref).abs().max() / ref.abs().max()))
    print(f"{scheduler_class} {prediction_type}: max |D - scheduler x0| / max |x0| = {worst:.2e}")
    assert worst < 1e-5


def test_sigma_to_timestep_is_exact_at_trained_steps_and_log_linear_between():
    ab = diffusers.DDPMScheduler().alphas_cumprod
    mapping = SigmaToTimestep(ab)
    sigmas = mapping.sigmas
    assert torch.equal(mapping.fractional(sigmas), torch.arange(1000, dtype=torch.float64))
    mid = (sigmas[:-1] * sigmas[1:]).sqrt()  # geometric means: halfway in log sigma
    assert torch.allclose(mapping.fractional(mid), torch.arange(999, dtype=torch.float64) + 0.5, atol=1e-9)
    # Outside the trained range the timestep is clamped to the end steps.
    assert mapping.fractional(torch.tensor([1e-4, 1e4])).tolist() == [0.0, 999.0]
    nearest = SigmaToTimestep(ab, "nearest")
    x = torch.tensor([float(sigmas[10]) * 1.001, float(mid[10]) * 1.001, float(sigmas[11])])
    assert nearest(x).tolist() == [10.0, 11.0, 11.0]
    assert torch.equal(nearest.nearest_sigma(x), sigmas[[10, 11, 11]])
    with pytest.raises(ValueError, match="timestep_rounding must be one of"):
        SigmaToTimestep(ab, "floor")
    with pytest.raises(ValueError, match="alphas_cumprod: must decrease strictly"):
        SigmaToTimestep(ab.flip(0))


def test_between_trained_steps_the_unet_sees_the_fractional_or_nearest_timestep():
    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler()
    sigmas = SigmaToTimestep(scheduler.alphas_cumprod).sigmas
    x = torch.randn(2, 1, 8, 8)
    sigma = float((sigmas[40] * sigmas[41]).sqrt()) * 1.01  # a little past halfway from step 40 to 41
    expected_step = 40 + math.log(sigma / sigmas[40]) / math.log(sigmas[41] / sigmas[40])

    def by_hand(step):  # epsilon: D = x - sigma eps(x / sqrt(1 + sigma^2), step)
        with torch.no_grad():
            eps = unet(x / math.sqrt(1 + sigma ** 2), torch.full((2,), step, dtype=torch.float32)).sample
        return x - sigma * eps

    interpolating = DiffusersDenoiser.from_scheduler(unet, scheduler)
    nearest = DiffusersDenoiser.from_scheduler(unet, scheduler, timestep_rounding="nearest")
    with torch.no_grad():
        torch.testing.assert_close(interpolating(x, sigma), by_hand(expected_step), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nearest(x, sigma), by_hand(41.0), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(interpolating(x, sigma), nearest(x, sigma), atol=1e-6)
        # Below the trained range: timestep 0 with the true sigma's coefficients.
        torch.testing.assert_close(interpolating(x, 0.002), x - 0.002 * unet(x / math.sqrt(1 + 0.002 ** 2),
                                                                             torch.zeros(2)).sample)
    # A sampler's grid rounded by 'nearest' lands on trained sigmas; 'interpolate' leaves it alone.
    grid = karras_sigmas(6, nearest.sigma_min, 80.0, round_sigma=nearest.round_sigma, append_zero=False)
    assert all(torch.isclose(sigmas, s).any() for s in grid)
    assert nearest.sigma_min == pytest.approx(float(sigmas[0])) and nearest.sigma_max == pytest.approx(float(sigmas[-1]))


def test_heun_sampling_through_the_adapter_runs():
    for rounding in ("interpolate", "nearest"):
        teacher = DiffusersDenoiser.from_scheduler(tiny_unet(), diffusers.DDPMScheduler(), timestep_rounding=rounding)
        with torch.no_grad():
            x = heun_sample(teacher, torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                            num_steps=4, sigma_max=80.0)
        assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_class_labels_and_encoder_hidden_states_pass_through():
    unet = tiny_unet(num_class_embeds=3)
    teacher = DiffusersDenoiser.from_scheduler(unet, diffusers.DDPMScheduler())
    assert teacher.label_dim == 3
    x, classes = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    with torch.no_grad():
        by_index = teacher(x, 1.0, classes)
        torch.testing.assert_close(teacher(x, 1.0, torch.nn.functional.one_hot(classes, 3).float()), by_index)
        assert not torch.allclose(teacher(x, 1.0, torch.tensor([1, 0, 2])), by_index)
        ab = 1 / (1 + 1.0 ** 2)
        ref = x - unet(x * math.sqrt(ab), teacher.timesteps(torch.ones(3)), class_labels=classes).sample
        torch.testing.assert_close(by_index, ref)
    with pytest.raises(ValueError, match="class_labels: this UNet is class-conditional"):
        teacher(x, 1.0)

    cross = DiffusersDenoiser.from_scheduler(tiny_cross_attention_unet(), diffusers.DDPMScheduler())
    assert cross.label_dim == 0 and cross.model.cross_attention
    states = torch.randn(3, 5, 12)
    with torch.no_grad():
        d = cross(x, 2.0, states)
        torch.testing.assert_close(cross(x, 2.0, {"encoder_hidden_states": states}), d)
        assert not torch.allclose(cross(x, 2.0, states + 1), d)
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        cross(x, 2.0)


@pytest.mark.parametrize("kind", ["class", "cross_attention"])
def test_pid_steps_lower_the_loss_of_a_student_copied_from_the_teacher(kind):
    if kind == "class":
        unet, labels = tiny_unet(num_class_embeds=3), torch.nn.functional.one_hot(torch.arange(4) % 3, 3).float()
    else:
        unet, labels = tiny_cross_attention_unet(), torch.randn(4, 5, 12)
    teacher = DiffusersDenoiser.from_scheduler(unet, diffusers.DDPMScheduler(prediction_type="v_prediction"))
    student = copy.deepcopy(teacher.model).train().requires_grad_(True)
    pid = PIDLoss(teacher, N=50, sigma_min=teacher.sigma_min, sigma_max=80.0)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 1, 8, 8, generator=gen) * 80.0
    indices = torch.randint(0, 50, (4,), generator=gen)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = pid(student, noise, labels, indices=indices)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0], losses


def test_learned_time_embeddings_take_nearest_timesteps_only():
    unet = tiny_unet(time_embedding_type="learned", num_train_timesteps=1000)
    teacher = DiffusersDenoiser.from_scheduler(unet, diffusers.DDPMScheduler())
    assert teacher.timestep_rounding == "nearest"
    with torch.no_grad():
        assert torch.isfinite(teacher(torch.randn(2, 1, 8, 8), 3.3)).all()
    with pytest.raises(ValueError, match="timestep_rounding: a UNet with learned"):
        DiffusersDenoiser.from_scheduler(unet, diffusers.DDPMScheduler(), timestep_rounding="interpolate")


def test_rebuild_config_round_trip_and_noise_rule():
    net = DiffusersUNet(tiny_unet(num_class_embeds=3))
    config = net.rebuild_config()
    assert config["model_type"] == "diffusers" and config["label_dim"] == 3
    assert (config["in_channels"], config["img_resolution"]) == (1, 8)
    rebuilt = build_diffusers_network(dict(config, dropout=0.1))
    assert rebuilt.unet.config["dropout"] == 0.1
    rebuilt.load_state_dict(net.state_dict())  # the same architecture
    teacher = DiffusersDenoiser.from_scheduler(net, diffusers.DDPMScheduler())
    rule = teacher.noise_rule()
    t = torch.tensor([0.002, 0.5, 80.0])
    assert torch.equal(diffusers_noise_labels(rule)(t), teacher.coefficients(t).c_noise)


def test_unsupported_models_and_prediction_types_are_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DiffusersDenoiser.from_scheduler(tiny_unet(), diffusers.DDPMScheduler(), prediction_type="flow")
    with pytest.raises(ValueError, match="time_embedding_type 'fourier'"):
        DiffusersDenoiser(tiny_unet(time_embedding_type="fourier"), diffusers.DDPMScheduler().alphas_cumprod)
    with pytest.raises(ValueError, match="scheduler: FlowMatchEulerDiscreteScheduler has no discrete"):
        DiffusersDenoiser.from_scheduler(tiny_unet(), diffusers.FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TypeError, match="unet: expected a diffusers UNet2DModel or UNet2DConditionModel"):
        DiffusersUNet(torch.nn.Linear(2, 2))


def test_the_diffusers_loop_example_runs(capsys):
    import os
    import runpy

    here = os.path.dirname(os.path.abspath(__file__))
    runpy.run_path(os.path.join(here, "..", "..", "examples", "diffusers_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert "one-step samples: (4, 1, 16, 16)" in out


def test_the_jvp_derivative_runs_through_a_diffusers_student():
    teacher = DiffusersDenoiser.from_scheduler(tiny_unet(), diffusers.DDPMScheduler())
    student = copy.deepcopy(teacher.model).train().requires_grad_(True)
    noise = 80.0 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    indices = torch.tensor([0, 10, 30, 49])
    fd, jvp = (PIDLoss(teacher, N=50, sigma_min=teacher.sigma_min, derivative=d)(student, noise, indices=indices)
               for d in ("fd", "jvp"))
    jvp.backward()  # forward-mode AD through diffusers' time embedding, then the usual backward
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert float(jvp) == pytest.approx(float(fd), rel=0.05)  # the O(dt) gap between the two derivatives


# ----------------------------------------------------------------------------------------
# learned variance (iDDPM / ADM / DiT style: out_channels = 2 in_channels)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_a_learned_variance_unet_denoises_with_its_prediction_half(variance_type):
    """D equals the x0 DDPMScheduler.step derives from the full [prediction, variance] output."""
    unet = tiny_unet(out_channels=2)
    scheduler = diffusers.DDPMScheduler(variance_type=variance_type, clip_sample=False)
    teacher = DiffusersDenoiser.from_scheduler(unet, scheduler)
    assert teacher.model.learned_variance and teacher.model.out_channels == 1
    assert teacher.model.rebuild_config()["out_channels"] == 1  # the student's images: 1 channel
    assert teacher.model.rebuild_config()["unet_config"]["out_channels"] == 2  # the architecture kept
    gen = torch.Generator().manual_seed(1)
    x0, eps = 0.5 * torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    worst = 0.0
    for t in TIMESTEPS:
        ab = scheduler.alphas_cumprod[t].double()
        x_t = scheduler.add_noise(x0, eps, torch.full((3,), t))
        with torch.no_grad():
            d = teacher(x_t.double() / ab.sqrt(), ((1 - ab) / ab).sqrt().float())
        ref = _scheduler_x0(scheduler, unet, x_t, t)
        assert d.shape == ref.shape == (3, 1, 8, 8)
        worst = max(worst, float((d - ref).abs().max() / ref.abs().max()))
    assert worst < 1e-5, worst


def test_a_learned_variance_unet_as_a_drop_in_student_gives_its_prediction_half():
    """PIDLoss with a bare learned-variance UNet2DModel as the student: the same loss as through
    DiffusersUNet, and the variance half of the output layer gets zero gradient."""
    unet = tiny_unet(out_channels=2)
    teacher = DiffusersDenoiser.from_scheduler(copy.deepcopy(unet), diffusers.DDPMScheduler(variance_type="learned_range"))
    pid = PIDLoss(teacher, N=20, sigma_min=teacher.sigma_min, sigma_max=80.0)
    gen = torch.Generator().manual_seed(0)
    noise, indices = torch.randn(4, 1, 8, 8, generator=gen) * 80.0, torch.randint(0, 20, (4,), generator=gen)
    bare = copy.deepcopy(unet).train().requires_grad_(True)
    wrapped = copy.deepcopy(teacher.model).train().requires_grad_(True)
    loss_bare, loss_wrapped = pid(bare, noise, indices=indices), pid(wrapped, noise, indices=indices)
    torch.testing.assert_close(loss_bare, loss_wrapped, rtol=1e-6, atol=0)
    loss_bare.backward()
    grad = bare.conv_out.weight.grad
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0
