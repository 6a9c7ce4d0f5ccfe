"""diffusers UNets as pid_fast networks and denoisers (diffusers is imported only to build one).

A diffusers UNet (UNet2DModel, UNet2DConditionModel; or a DiTTransformer2DModel, called alike) trained with a discrete DDPM-style
schedule alphas_cumprod[k] (ab_k) sees the VP sample x_t = sqrt(ab_k) x0 + sqrt(1 - ab_k) eps
at timestep k. In EDM's VE convention x = x_t / sqrt(ab) = x0 + sigma eps with

    sigma_k = sqrt((1 - ab_k) / ab_k),   so   x_t = x / sqrt(1 + sigma^2),  ab = 1 / (1 + sigma^2),

and the UNet's prediction gives the denoiser D(x; sigma) = c_skip x + c_out F(c_in x, k(sigma)) with
c_in = 1 / sqrt(1 + sigma^2) and
    epsilon:       x0 = x - sigma eps                    c_skip = 1,             c_out = -sigma
    v_prediction:  x0 = sqrt(ab) x_t - sqrt(1 - ab) v    c_skip = 1/(1+sigma^2), c_out = -sigma/sqrt(1+sigma^2)
    sample:        x0 = F                                c_skip = 0,             c_out = 1.

Sigmas between two trained steps (``timestep_rounding``):
- "interpolate" (the default for sinusoidal time embeddings): the fractional timestep linear in
  log sigma between the two trained neighbours, k + (ln s - ln s_k) / (ln s_k+1 - ln s_k).
  diffusers' sinusoidal embeddings take float timesteps, and PID differentiates the student
  between neighbouring grid times (at N = 250 several grid times fall between two trained
  steps near sigma_min), which needs a time label that moves with t.
- "nearest": the nearest trained step in log sigma (EDM's iDDPM wrapper rounds likewise);
  ``round_sigma`` then maps a sampler's grid onto trained sigmas. Required for "learned"
  (lookup-table) time embeddings.
Outside the trained range [sigma_0, sigma_{K-1}] the time label is clamped to the end step
while c_skip, c_out and c_in keep the true sigma. ``sigma_min``/``sigma_max`` are the
trained range (samplers clip to them, as EDM's do); the PID grid is the loss's own.

Schedulers (``DiffusersDenoiser.from_scheduler`` / ``denoiser_from_scheduler``):
- DDPM-style discrete schedules (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, ...: anything
  with ``alphas_cumprod`` and a prediction_type): ``DiffusersDenoiser`` above.
- zero terminal SNR (``rescale_betas_zero_snr=True``: alphas_cumprod ends at 0, an infinite sigma):
  the terminal step has no finite sigma, so the sigma <-> timestep table and the trained range stop
  at the step before it (K-2); samplers on the scheduler's own grid (``scheduler_grid``) still start
  at the terminal timestep with diffusers' stand-in alphas_cumprod 2**-24, as its Euler scheduler does.
- continuous time labels (EulerDiscreteScheduler with timestep_type="continuous" and v_prediction,
  e.g. CosXL-style models): the UNet's timestep is ln(sigma) / 4 instead of the step index
  (``log_sigma_timesteps``); the coefficients and trained range are the discrete schedule's.
- EDM-parametrised schedules (EDMEulerScheduler, EDMDPMSolverMultistepScheduler, e.g. Playground
  v2.5): ``DiffusersEDMDenoiser``, D = c_skip x + c_out F(c_in x, ln(sigma) / 4) with the scheduler's
  sigma_data, c_skip = sd^2 / (sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2) and
  c_out = +-sigma sd / sqrt(sigma^2 + sd^2) (+ for 'epsilon', - for 'v_prediction', as diffusers'
  precondition_outputs; 'sample' is refused there too); the trained range is the scheduler's
  [sigma_min, sigma_max].
Anything else (flow matching, score-SDE VE) is refused with the scheduler's name.

Learned variance: a UNet with twice as many output channels as input channels (iDDPM / ADM / DiT
style, out_channels = 2 in_channels, the scheduler's variance_type "learned" or "learned_range")
predicts [prediction, variance] along the channels; the denoiser, the PID student copied from it,
the reference loop and the exported pipelines take the first half (as diffusers' DiT pipeline and
DDPMScheduler.step do) and the deterministic samplers and PID do not use the variance.

Labels: a class-conditional UNet (num_class_embeds; a DiT's num_embeds_ada_norm) takes one-hot or
integer class labels; an all-zero one-hot row is "no class", the null class of a network whose label
table has one after the classes (DiT trained with label dropout: index = number of classes), an error
for one without (give guidance's null_label instead). A DiT's label embedding drops labels at random
in train mode: ``DiffusersUNet`` keeps it in eval mode (PID needs a deterministic student); a
cross-attention UNet takes encoder_hidden_states [B, L, D] as the labels tensor; any UNet
takes a mapping of its keyword arguments (e.g. {"encoder_hidden_states": ..., "class_labels": ...}).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from pid_fast.models.preconditioning import Coefficients, Preconditioning, _check_batch, _per_sample, sigma_vector

__all__ = ["PREDICTION_TYPES", "TIMESTEP_ROUNDINGS", "UNET_CLASSES", "LATENT_CLASSES", "is_latent_network", "EDM_SCHEDULERS", "SAMPLER_SCHEDULERS",
           "import_diffusers", "schedule_sigmas", "scheduler_alphas_cumprod", "scheduler_sigma_range",
           "SigmaToTimestep", "DiffusersUNet", "DiffusersDenoiser", "DiffusersEDMDenoiser", "denoiser_from_scheduler",
           "sampler_scheduler", "scheduler_grid", "diffusers_loop", "build_diffusers_network", "is_diffusers_network",
           "diffusers_noise_labels", "prediction_channels", "prediction_part",
           "one_step_settings"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_ROUNDINGS = ("interpolate", "nearest")
# the networks taken (DiTTransformer2DModel: class-conditional latent transformers, e.g. DiT-XL/2)
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")
# networks that always denoise VAE latents (not images in [-1, 1]): their samples are not clamped
LATENT_CLASSES = ("DiTTransformer2DModel",)
# EDM-parametrised diffusers schedulers (DiffusersEDMDenoiser) and their prediction types
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
# The diffusers scheduler whose loop each pid_fast solver reproduces on the scheduler's own grid
SAMPLER_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler"}
# diffusers' stand-in for a zero terminal alphas_cumprod (EulerDiscreteScheduler, rescale_betas_zero_snr)
ZERO_SNR_ALPHA_CUMPROD = 2.0 ** -24


def import_diffusers(what: str):
    """The diffusers module, or ImportError naming ``what`` needs it and the pip command."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"{what} needs diffusers (not installed): pip install 'pid_fast[diffusers]'") from None
    return diffusers


def schedule_sigmas(alphas_cumprod: Any, name: str = "alphas_cumprod") -> torch.Tensor:
    """sigma_k = sqrt((1 - ab_k) / ab_k) in float64, checked strictly increasing and positive."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1).cpu()
    if ab.numel() >= 2 and float(ab[-1]) == 0 and bool((ab[:-1] > 0).all()):
        raise ValueError(f"{name}: ends at 0, a zero-terminal-SNR schedule (rescale_betas_zero_snr=True) whose last "
                         f"step has an infinite sigma; pass the scheduler (DiffusersDenoiser.from_scheduler / "
                         f"load_diffusers_teacher drop that step) or alphas_cumprod[:-1]")
    if ab.numel() < 2 or not bool(((ab > 0) & (ab < 1)).all()):
        raise ValueError(f"{name}: expected at least 2 values in (0, 1), got {ab.numel()} values in "
                         f"[{float(ab.min()) if ab.numel() else 'n/a'}, {float(ab.max()) if ab.numel() else 'n/a'}]")
    sigmas = ((1 - ab) / ab).sqrt()
    if not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError(f"{name}: must decrease strictly (the noise level must grow with the timestep)")
    return sigmas


class SigmaToTimestep:
    """sigma -> the UNet's timestep label on a trained schedule (see the module docstring)."""

    def __init__(self, alphas_cumprod: Any, rounding: str = "interpolate"):
        if rounding not in TIMESTEP_ROUNDINGS:
            raise ValueError(f"timestep_rounding must be one of {TIMESTEP_ROUNDINGS}, got {rounding!r}")
        self.sigmas = schedule_sigmas(alphas_cumprod)
        self.log_sigmas = self.sigmas.log()
        self.rounding = rounding
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:  # one copy per device, not one per call
            self._on_device[device] = self.log_sigmas.to(device)
        return self._on_device[device]

    def fractional(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep linear in log sigma between the trained neighbours, clamped to [0, K-1],
        float64 (exactly k at sigma_k up to rounding of sigma)."""
        table = self._table(sigma.device)
        log_s = sigma.to(torch.float64).clamp_min(1e-300).log().clamp(table[0], table[-1])
        low = (torch.searchsorted(table, log_s, right=True) - 1).clamp(0, table.numel() - 2)
        frac = (log_s - table[low]) / (table[low + 1] - table[low])
        return low.to(torch.float64) + frac

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        """The time label (float32) of each sigma."""
        steps = self.fractional(sigma)
        if self.rounding == "nearest":
            steps = steps.round()
        return steps.to(torch.float32)

    def nearest_sigma(self, sigma: Any) -> torch.Tensor:
        """The trained sigma whose timestep is nearest in log sigma (float64)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.sigmas.to(sigma.device)[self.fractional(sigma).round().long()]


def prediction_channels(unet_config: Mapping[str, Any]) -> int:
    """The channels of a UNet's prediction: in_channels for a learned-variance UNet (out_channels =
    2 in_channels: [prediction, variance]), else out_channels."""
    cin, cout = int(unet_config["in_channels"]), output_channels(unet_config)
    return cin if cout == 2 * cin else cout


def output_channels(unet_config: Mapping[str, Any]) -> int:
    """The channels of a network's output (DiT's out_channels None: as many as in_channels)."""
    return int(unet_config.get("out_channels") or unet_config["in_channels"])


def prediction_part(out: torch.Tensor, channels: int) -> torch.Tensor:
    """A UNet output without its learned-variance half (``out`` as is when it has ``channels``)."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def is_diffusers_network(config: Any) -> bool:
    """True for a network config written by ``DiffusersUNet.rebuild_config``."""
    return isinstance(config, Mapping) and config.get("model_type") == "diffusers"


def _plain(value: Any) -> Any:
    # A diffusers config value as JSON-able data (tuples -> lists).
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class DiffusersUNet(nn.Module):
    """The raw network F(x_in, c_noise, labels) of a diffusers UNet: F = unet(x_in, c_noise, ...).sample,
    run in the UNet's dtype. c_noise is the (possibly fractional) timestep; labels as in the
    module docstring. This is the PID student's network and the teacher's ``model``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        name = type(unet).__name__
        if name not in UNET_CLASSES:
            raise TypeError(f"unet: expected a diffusers {' or '.join(UNET_CLASSES)}, got {name}")
        cfg = unet.config
        if cfg.get("time_embedding_type", "positional") == "fourier":
            raise ValueError("unet: time_embedding_type 'fourier' (score-SDE VE models, timestep = sigma) is not "
                             "supported; DDPM-style UNets (positional or learned time embeddings) are")
        self.unet = unet
        self.integer_timesteps = cfg.get("time_embedding_type", "positional") == "learned"
        self.cross_attention = name == "UNet2DConditionModel"
        if name == "DiTTransformer2DModel":  # always class-conditional (num_embeds_ada_norm classes)
            self.label_dim = int(cfg.get("num_embeds_ada_norm") or 0)
        else:
            self.label_dim = int(cfg.get("num_class_embeds") or 0) if cfg.get("class_embed_type") is None else 0
        # the class index of the unconditional input, when the network has one: DiT's label table has
        # a row after the classes (index label_dim, its pipeline's class_null) when trained with dropout
        self.null_class = self.label_dim if _label_tables(unet, self.label_dim + 1) else None
        self.out_channels = prediction_channels(cfg)  # the variance half of a learned-variance UNet dropped
        self.learned_variance = self.out_channels != output_channels(cfg)
        self.latent = name in LATENT_CLASSES  # its samples are latents: never clamped to [-1, 1]
        self.train(self.training)

    def train(self, mode: bool = True) -> "DiffusersUNet":
        """Train mode, but label embeddings that drop labels at random in train mode (DiT's
        LabelEmbedding, class_dropout_prob 0.1) stay in eval mode: PID needs one deterministic network
        (the two evaluations would see different labels), and the unconditional input is the null
        class given explicitly (guidance)."""
        super().train(mode)
        for table in _label_tables(self.unet):
            table.eval()
        return self

    def rebuild_config(self) -> dict:
        """A JSON-able network config from which ``build_diffusers_network`` rebuilds this
        architecture (the student checkpoint's 'network')."""
        cfg = self.unet.config
        size = cfg.get("sample_size")
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"unet: sample_size {tuple(size)} is not square; pid_fast's students are square")
            size = size[0]
        if not isinstance(size, int):
            raise ValueError(f"unet: its config has no sample_size (got {size!r}); set it to the image resolution")
        unet_config = {k: _plain(v) for k, v in cfg.items() if not k.startswith("_")}
        return {"model_type": "diffusers", "class_name": type(self.unet).__name__, "unet_config": unet_config,
                "in_channels": int(cfg["in_channels"]), "out_channels": self.out_channels,
                "learned_variance": self.learned_variance, "img_resolution": size, "label_dim": self.label_dim, "dropout": float(cfg.get("dropout", 0.0))}

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: Any = None) -> torch.Tensor:
        dtype = self.unet.dtype
        timesteps = c_noise.reshape(-1)
        if self.integer_timesteps:  # a lookup table: integer steps only (timestep_rounding 'nearest')
            timesteps = timesteps.round().long()
        out = self.unet(x_in.to(dtype), timesteps, **self._conditioning(class_labels, x_in.shape[0])).sample
        return out[:, :self.out_channels] if self.learned_variance else out

    def _conditioning(self, labels: Any, batch: int) -> dict:
        """The UNet's keyword arguments for ``labels``."""
        if isinstance(labels, Mapping):
            return dict(labels)
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise TypeError(f"class_labels: expected a tensor, a mapping of UNet arguments or None, "
                            f"got {type(labels).__name__}")
        if self.cross_attention:
            if labels is None:
                raise ValueError("class_labels: a UNet2DConditionModel needs encoder_hidden_states [B, L, D] as its "
                                 "labels (or a mapping {'encoder_hidden_states': ...})")
            return {"encoder_hidden_states": labels.to(self.unet.dtype)}
        if self.label_dim == 0:
            if labels is not None:
                raise ValueError("class_labels: this UNet is unconditional (no num_class_embeds); pass None")
            return {}
        if labels is None:
            raise ValueError(f"class_labels: this UNet is class-conditional ({self.label_dim} classes); pass labels")
        if labels.is_floating_point():  # one-hot (or soft) [B, label_dim] -> class index
            labels = labels.reshape(batch, self.label_dim)
            empty = labels.abs().amax(1) == 0  # an all-zero row: no class (the unconditional input)
            if self.null_class is not None:  # no host sync: the null class replaces the empty rows
                labels = torch.where(empty, self.null_class, labels.argmax(1))
            elif bool(empty.any()):  # (a host sync, only for networks without a null class)
                raise ValueError("class_labels: an all-zero label (no class) but this network has no null "
                                 "class to stand for it; give the guide's class index "
                                 "(teacher.guidance.null_label) or one-hot labels")
            else:
                labels = labels.argmax(1)
        return {"class_labels": labels.reshape(batch).long()}


def _label_tables(unet: nn.Module, rows: Optional[int] = None) -> list[nn.Module]:
    """The network's label embeddings that drop labels in train mode (diffusers' LabelEmbedding:
    ``dropout_prob`` and ``token_drop``), those whose table has ``rows`` rows when given."""
    found = []
    for module in unet.modules():
        if hasattr(module, "token_drop") and isinstance(getattr(module, "dropout_prob", None), (int, float)):
            table = getattr(module, "embedding_table", None)
            if rows is None or (isinstance(table, nn.Embedding) and table.num_embeddings == rows
                                and float(module.dropout_prob) > 0):
                found.append(module)
    return found


def build_diffusers_network(config: Mapping[str, Any], device: torch.device | str | None = None) -> DiffusersUNet:
    """A freshly initialised ``DiffusersUNet`` from a config written by ``rebuild_config`` (with
    config['dropout'] applied to the UNet)."""
    if not is_diffusers_network(config):
        raise ValueError(f"network config: expected model_type 'diffusers', got {dict(config).get('model_type')!r}")
    diffusers = import_diffusers("a diffusers student")
    name = config.get("class_name")
    if name not in UNET_CLASSES:
        raise ValueError(f"network config: class_name must be one of {UNET_CLASSES}, got {name!r}")
    unet_config = dict(config["unet_config"])
    if config.get("dropout") is not None:
        unet_config["dropout"] = float(config["dropout"])
    unet = getattr(diffusers, name).from_config(unet_config)
    return DiffusersUNet(unet.to(device) if device is not None else unet)


def diffusers_noise_labels(rule: Mapping[str, Any]):
    """t -> the time label, for a student noise rule {'precond': 'diffusers', 'alphas_cumprod',
    'timestep_rounding'} (recorded by the trainer; see DiffusersDenoiser.noise_rule)."""
    return SigmaToTimestep(rule["alphas_cumprod"], rule.get("timestep_rounding", "interpolate"))


def _scheduler_config(scheduler: Any) -> dict:
    """A scheduler's config as a plain dict with its '_class_name'."""
    config = getattr(scheduler, "config", None)
    if config is None:
        raise ValueError(f"scheduler: expected a diffusers scheduler (with a config), got {type(scheduler).__name__}")
    return {**{k: _plain(v) for k, v in dict(config).items()}, "_class_name": type(scheduler).__name__}


def _continuous_timesteps(config: Mapping[str, Any]) -> bool:
    """EulerDiscreteScheduler's timestep_type 'continuous' (with v_prediction, where it applies):
    the UNet's timestep is ln(sigma) / 4."""
    return config.get("timestep_type") == "continuous" and config.get("prediction_type") == "v_prediction"


def _zero_terminal_snr(scheduler: Any) -> bool:
    return bool(getattr(scheduler, "config", {}).get("rescale_betas_zero_snr", False))


def scheduler_alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """The alphas_cumprod of a DDPM-style scheduler whose steps all have a finite sigma: a
    zero-terminal-SNR schedule (rescale_betas_zero_snr) without its last step (module docstring)."""
    ab = getattr(scheduler, "alphas_cumprod", None)
    config = getattr(scheduler, "config", None)
    if ab is None or config is None or "prediction_type" not in config:
        raise ValueError(f"scheduler: {type(scheduler).__name__} has no discrete alphas_cumprod schedule with a "
                         f"prediction_type (supported: DDPM-style schedulers such as DDPMScheduler, "
                         f"DDIMScheduler, EulerDiscreteScheduler, and the EDM ones: {', '.join(EDM_SCHEDULERS)})")
    ab = torch.as_tensor(ab, dtype=torch.float64).reshape(-1)
    if _zero_terminal_snr(scheduler):
        # diffusers keeps 0 (DDPM, DDIM) or puts 2**-24 (Euler) at the terminal step; either way
        # that step is not part of the schedule's finite, increasing sigmas.
        ab = ab[:-1]
    return ab


def scheduler_sigma_range(scheduler: Any) -> tuple[float, float]:
    """The trained sigma range [sigma_min, sigma_max] of a supported diffusers scheduler: the
    ends of a DDPM-style schedule, or an EDM scheduler's config sigma_min / sigma_max."""
    if type(scheduler).__name__ in EDM_SCHEDULERS:
        return float(scheduler.config["sigma_min"]), float(scheduler.config["sigma_max"])
    sigmas = schedule_sigmas(scheduler_alphas_cumprod(scheduler))
    return float(sigmas[0]), float(sigmas[-1])


def denoiser_from_scheduler(unet: nn.Module, scheduler: Any, **kwargs: Any) -> "DiffusersDenoiser":
    """The denoiser of ``unet`` under a diffusers ``scheduler``: a DiffusersEDMDenoiser for the EDM
    schedulers (EDM_SCHEDULERS), else a DiffusersDenoiser on the discrete schedule. ``kwargs``:
    the class's keyword arguments (e.g. prediction_type, which overrides the scheduler's)."""
    if type(scheduler).__name__ in EDM_SCHEDULERS:
        return DiffusersEDMDenoiser.from_scheduler(unet, scheduler, **kwargs)
    return DiffusersDenoiser.from_scheduler(unet, scheduler, **kwargs)


class DiffusersDenoiser(Preconditioning):
    """D(x; sigma) of a diffusers UNet on its discrete schedule (the module docstring gives the
    coefficients). ``model``: a DiffusersUNet or a bare UNet2DModel / UNet2DConditionModel;
    ``alphas_cumprod``: the schedule's (a scheduler's ``alphas_cumprod``); ``prediction_type``:
    'epsilon', 'v_prediction' or 'sample'; ``timestep_rounding``: 'interpolate' | 'nearest'
    (None: 'nearest' for learned time embeddings, else 'interpolate'); ``sigma_min`` /
    ``sigma_max``: default the trained range; ``scheduler_config``: the scheduler's config
    (with '_class_name'), which the samplers' grid="scheduler" reads (``scheduler_grid``)."""

    def __init__(self, model: nn.Module, alphas_cumprod: Any, prediction_type: str = "epsilon", *,
                 timestep_rounding: Optional[str] = None, sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None, sigma_data: float = 0.5,
                 scheduler_config: Optional[Mapping[str, Any]] = None, log_sigma_timesteps: bool = False):
        model = self._wrap(model)
        super().__init__(model, label_dim=model.label_dim)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if log_sigma_timesteps and model.integer_timesteps:
            raise ValueError("timestep_type: a UNet with learned (lookup-table) time embeddings takes integer "
                             "timesteps, not continuous ones (ln(sigma) / 4)")
        if timestep_rounding is None:
            timestep_rounding = "nearest" if model.integer_timesteps else "interpolate"
        if model.integer_timesteps and timestep_rounding != "nearest":
            raise ValueError("timestep_rounding: a UNet with learned (lookup-table) time embeddings takes integer "
                             f"timesteps only; use 'nearest', got {timestep_rounding!r}")
        self.timesteps = SigmaToTimestep(alphas_cumprod, timestep_rounding)
        self.prediction_type = prediction_type
        self.timestep_rounding = timestep_rounding
        self.alphas_cumprod = [float(v) for v in torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)]
        self.sigma_min = float(self.timesteps.sigmas[0] if sigma_min is None else sigma_min)
        self.sigma_max = float(self.timesteps.sigmas[-1] if sigma_max is None else sigma_max)
        self.sigma_data = float(sigma_data)
        self.scheduler_config = None if scheduler_config is None else dict(scheduler_config)
        self.log_sigma_timesteps = bool(log_sigma_timesteps)

    @staticmethod
    def _wrap(model: nn.Module) -> "DiffusersUNet":
        return model if isinstance(model, DiffusersUNet) else DiffusersUNet(model)

    @classmethod
    def from_scheduler(cls, unet: nn.Module, scheduler: Any, **kwargs: Any) -> "DiffusersDenoiser":
        """From a diffusers scheduler object (DDPMScheduler, DDIMScheduler, ... : anything with
        ``alphas_cumprod`` and ``config.prediction_type``; zero terminal SNR without its last step)."""
        if type(scheduler).__name__ in EDM_SCHEDULERS:
            raise ValueError(f"scheduler: {type(scheduler).__name__} is EDM-parametrised; use "
                             f"DiffusersEDMDenoiser.from_scheduler or denoiser_from_scheduler")
        ab = scheduler_alphas_cumprod(scheduler)
        kwargs.setdefault("prediction_type", scheduler.config["prediction_type"])
        kwargs.setdefault("scheduler_config", _scheduler_config(scheduler))
        # EulerDiscreteScheduler feeds ln(sigma) / 4 as the timestep in this setting only
        kwargs.setdefault("log_sigma_timesteps", _continuous_timesteps(scheduler.config))
        return cls(unet, ab, **kwargs)

    def pid_sigma_range(self) -> tuple[float, float]:
        """PID's default range: the trained one, [sigma_min, sigma_max]."""
        return self.sigma_min, self.sigma_max

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        one = torch.ones_like(sigma)
        c_in = (sigma.square() + 1).rsqrt()
        if self.prediction_type == "epsilon":
            c_skip, c_out = one, -sigma
        elif self.prediction_type == "v_prediction":
            c_skip, c_out = c_in.square(), -sigma * c_in
        else:
            c_skip, c_out = torch.zeros_like(sigma), one
        c_noise = sigma.log() / 4 if self.log_sigma_timesteps else self.timesteps(sigma).to(sigma.dtype)
        return Coefficients(c_skip=c_skip, c_out=c_out, c_in=c_in, c_noise=c_noise)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        if self.timestep_rounding == "nearest" and not self.log_sigma_timesteps:
            return self.timesteps.nearest_sigma(sigma)
        return torch.as_tensor(sigma)

    def model_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        return self.model.unet.dtype

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: Any = None,
            force_fp32: bool = False) -> torch.Tensor:
        """F(x_in, timestep, labels) in fp32 (the UNet runs in its own dtype)."""
        return self.model(x_in, c_noise.reshape(-1), class_labels).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Any = None, force_fp32: bool = False,
                timestep: Any = None) -> torch.Tensor:
        """D(x; sigma). ``timestep``: the UNet's time label instead of the one of sigma (a sampler
        on a diffusers scheduler's own grid passes the scheduler's timesteps)."""
        x = _check_batch(x, type(self).__name__).to(torch.float32)
        sigma = sigma_vector(sigma, x.shape[0], device=x.device)
        c = self.coefficients(sigma)
        c_noise = c.c_noise if timestep is None else sigma_vector(timestep, x.shape[0], device=x.device,
                                                                  name="timestep")
        F_x = self.raw(_per_sample(c.c_in, x.ndim) * x, c_noise, class_labels)
        return _per_sample(c.c_skip, x.ndim) * x + _per_sample(c.c_out, x.ndim) * F_x

    def sampling_grid(self, num_steps: int, solver: str) -> dict:
        """The grid of the diffusers loop of ``solver`` on this teacher's scheduler (``scheduler_grid``);
        what the samplers' grid="scheduler" runs on."""
        if self.scheduler_config is None:
            raise ValueError(f"grid='scheduler': this {type(self).__name__} was built without its scheduler; build it "
                             f"with from_scheduler / load_diffusers_teacher, or pass scheduler_config")
        return scheduler_grid(self.scheduler_config, num_steps, solver)

    def noise_rule(self) -> dict:
        """The student's time-label rule, JSON-able (the checkpoint's 'noise_rule')."""
        if self.log_sigma_timesteps:  # EDM's label ln(t) / 4
            return {"precond": "edm"}
        return {"precond": "diffusers", "alphas_cumprod": list(self.alphas_cumprod),
                "timestep_rounding": self.timestep_rounding}

    def extra_repr(self) -> str:
        return (f"prediction_type={self.prediction_type!r}, timestep_rounding={self.timestep_rounding!r}, "
                f"steps={len(self.alphas_cumprod)}, sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g}")


class DiffusersEDMDenoiser(DiffusersDenoiser):
    """D(x; sigma) of a diffusers UNet under an EDM scheduler (EDMEulerScheduler,
    EDMDPMSolverMultistepScheduler): EDM's preconditioning with the scheduler's sigma_data and
    diffusers' sign of c_out per prediction type (module docstring). Time label ln(sigma) / 4, as
    EDM's, so the student's noise rule is EDM's."""

    def __init__(self, model: nn.Module, prediction_type: str = "epsilon", *, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0,
                 scheduler_config: Optional[Mapping[str, Any]] = None):
        model = self._wrap(model)
        Preconditioning.__init__(self, model, label_dim=model.label_dim)
        if prediction_type not in EDM_PREDICTION_TYPES:
            raise ValueError(f"prediction_type: the EDM schedulers' preconditioning (precondition_outputs) takes "
                             f"{' or '.join(EDM_PREDICTION_TYPES)}, got {prediction_type!r}")
        if model.integer_timesteps:
            raise ValueError("unet: learned (lookup-table) time embeddings take integer timesteps; an EDM scheduler's "
                             "time label is ln(sigma) / 4")
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data: must be a positive number, got {sigma_data!r}")
        self.prediction_type = prediction_type
        self.timestep_rounding, self.log_sigma_timesteps = "interpolate", True
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.scheduler_config = None if scheduler_config is None else dict(scheduler_config)

    @classmethod
    def from_scheduler(cls, unet: nn.Module, scheduler: Any, **kwargs: Any) -> "DiffusersEDMDenoiser":
        name = type(scheduler).__name__
        if name not in EDM_SCHEDULERS:
            raise ValueError(f"scheduler: expected one of {EDM_SCHEDULERS}, got {name}")
        config = scheduler.config
        if kwargs.pop("timestep_rounding", None) not in (None, "interpolate"):
            raise ValueError(f"timestep_rounding: an EDM scheduler ({name}) has continuous time labels; leave it unset")
        kwargs.setdefault("prediction_type", config["prediction_type"])
        lo, hi = scheduler_sigma_range(scheduler)
        return cls(unet, sigma_data=float(config["sigma_data"]), sigma_min=lo, sigma_max=hi,
                   scheduler_config=_scheduler_config(scheduler), **kwargs)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        sd2 = self.sigma_data ** 2
        c_in = (sigma.square() + sd2).rsqrt()
        sign = 1.0 if self.prediction_type == "epsilon" else -1.0
        return Coefficients(c_skip=sd2 / (sigma.square() + sd2), c_out=sign * sigma * self.sigma_data * c_in,
                            c_in=c_in, c_noise=sigma.log() / 4)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def noise_rule(self) -> dict:
        return {"precond": "edm"}

    def extra_repr(self) -> str:
        return (f"prediction_type={self.prediction_type!r}, sigma_data={self.sigma_data:.4g}, "
                f"sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g}")


def sampler_scheduler(scheduler_config: Mapping[str, Any], num_steps: int, solver: str) -> Any:
    """The diffusers scheduler whose loop ``solver`` ('euler' | 'heun') reproduces, built from a
    teacher's scheduler config and set to ``num_steps``: EulerDiscreteScheduler /
    HeunDiscreteScheduler (the config's timestep_spacing, steps_offset, karras sigmas, ... apply),
    EDMEulerScheduler for an EDM teacher, and Euler's for a zero-terminal-SNR schedule
    (HeunDiscreteScheduler has no rescale_betas_zero_snr)."""
    if solver not in SAMPLER_SCHEDULERS:
        raise ValueError(f"solver must be one of {sorted(SAMPLER_SCHEDULERS)}, got {solver!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    diffusers = import_diffusers("grid='scheduler'")
    config = dict(scheduler_config)
    if config.get("_class_name") in EDM_SCHEDULERS:
        name = "EDMEulerScheduler"
    elif config.get("rescale_betas_zero_snr"):
        name = SAMPLER_SCHEDULERS["euler"]
    else:
        name = SAMPLER_SCHEDULERS[solver]
    scheduler = getattr(diffusers, name).from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def scheduler_grid(scheduler_config: Mapping[str, Any], num_steps: int, solver: str) -> dict:
    """The sampling grid of the diffusers loop of ``solver`` (``sampler_scheduler``): {'sigmas': the
    num_steps + 1 noise levels (float64, ending with the scheduler's final sigma), 'timesteps': the
    UNet's time label at each of the first num_steps, 'init_noise_sigma': the scale of the initial
    noise, 'clip_denoised': the range the loop clamps the denoised sample to (clip_sample, which
    HeunDiscreteScheduler honours) or None, 'scheduler': its class name}. Heun's interleaved lists are
    read back as one point per step."""
    scheduler = sampler_scheduler(scheduler_config, num_steps, solver)
    name = type(scheduler).__name__
    sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float64).reshape(-1).cpu()
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float64).reshape(-1).cpu()
    if name == "HeunDiscreteScheduler":  # [s0, s1, s1, ..., s_K-1, s_K-1, end], [t0, t1, t1, ...]
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
        timesteps = torch.cat([timesteps[:1], timesteps[1::2]])
    if _continuous_timesteps(scheduler_config) and name != "EulerDiscreteScheduler":
        timesteps = sigmas[:-1].log() / 4  # only Euler has timestep_type; the UNet takes ln(sigma) / 4
    if sigmas.numel() != num_steps + 1 or timesteps.numel() != num_steps:
        raise ValueError(f"scheduler: {name}.set_timesteps({num_steps}) gave {sigmas.numel()} sigmas and "
                         f"{timesteps.numel()} timesteps; expected {num_steps + 1} and {num_steps}")
    # HeunDiscreteScheduler clamps its x0 prediction with clip_sample; EulerDiscreteScheduler has no
    # such setting (from_config keeps the teacher's key in its config all the same)
    takes_clip = "clip_sample" in inspect.signature(type(scheduler).__init__).parameters
    clip = float(scheduler.config["clip_sample_range"]) if takes_clip and scheduler.config.get("clip_sample") else None
    return {"sigmas": sigmas, "timesteps": timesteps, "init_noise_sigma": float(scheduler.init_noise_sigma),
            "clip_denoised": clip, "scheduler": name}


@torch.no_grad()
def diffusers_loop(unet: nn.Module, scheduler_config: Mapping[str, Any], latents: torch.Tensor, *, solver: str,
                   num_steps: int, **unet_kwargs: Any) -> torch.Tensor:
    """diffusers' own sampling loop (scale_model_input, the UNet, step) of ``sampler_scheduler``
    from ``latents`` z ~ N(0, I): the reference that grid="scheduler" reproduces. ``unet_kwargs``:
    e.g. class_labels=..."""
    scheduler = sampler_scheduler(scheduler_config, num_steps, solver)
    x = latents.to(torch.float32) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        # one timestep per sample, as diffusers' pipelines pass it (a DiT's embedding needs a 1-D tensor)
        out = prediction_part(unet(model_input, t.expand(x.shape[0]), **unet_kwargs).sample, x.shape[1])
        x = scheduler.step(out, t, x).prev_sample
    return x


def is_latent_network(config: Any) -> bool:
    """Whether a student's network config (checkpoint metadata 'network') is a latent diffusers
    network (LATENT_CLASSES): its one-step samples are latents, never clamped to [-1, 1]."""
    return is_diffusers_network(config) and config.get("class_name") in LATENT_CLASSES


def one_step_settings(meta: Mapping[str, Any]) -> dict:
    """The constants of a PID student's one-step sample x = noise_weight z + output_weight
    unet(input_scale z, timestep).sample (z ~ N(0, I)), from its checkpoint metadata: the
    student's x(n, t) = (t/T) n + (1 - t/T) F(c n, c_noise(t)) at t = sigma_min, n = T z."""
    T, t, sd = float(meta["sigma_max"]), float(meta["sigma_min"]), float(meta["sigma_data"])
    rule = meta["noise_rule"]
    if rule["precond"] == "edm":  # an EDM-scheduler teacher's label ln(t) / 4 (DiffusersEDMDenoiser)
        timestep = float(torch.tensor([t], dtype=torch.float32).log()[0] / 4)
    else:
        timestep = float(diffusers_noise_labels(rule)(torch.tensor([t], dtype=torch.float32))[0])
    clamp = None if is_latent_network(meta.get("network")) else [-1.0, 1.0]  # latents are not clamped
    return {"timestep": timestep, "input_scale": T / math.sqrt(sd * sd + T * T), "noise_weight": t,
            "output_weight": 1.0 - t / T, "clamp": clamp, "sigma_min": t, "sigma_max": T, "sigma_data": sd,
            "shape": list(meta["shape"]), "label_dim": int(meta["label_dim"])}
