"""Denoisers: preconditioning wrappers (EDM, VP, VE), adapters for user callables, an
analytic Gaussian denoiser, and the PID student parametrization coefficients.

Every denoiser here has the form

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), labels)

and exposes the four per-sample coefficients as (B,) tensors through
`coefficients(sigma)`, and F through `raw(x_in, c_noise, labels)`, because PID's fused ops
take them in that form. A denoiser that is only a callable D(x, sigma, labels) is adapted
with the identity coefficients c_skip = 0, c_out = 1, c_in = 1, c_noise = sigma.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "Coefficients", "StudentCoefficients", "Denoiser", "Preconditioning", "EDMPrecond", "VPPrecond",
    "VEPrecond", "DirectDenoiser", "FunctionDenoiser", "GaussianDenoiser", "PRECONDITIONINGS", "as_denoiser",
    "sigma_vector", "edm_coefficients", "student_coefficients", "edm_preconditioning",
    "declared_sigma_data",
]


class Coefficients(NamedTuple):
    """Per-sample preconditioning coefficients, each a (B,) tensor."""
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


class StudentCoefficients(NamedTuple):
    """PID student x = a n + b F(c n, c_noise(t), labels); each a (B,) tensor."""
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor


@runtime_checkable
class Denoiser(Protocol):
    """Anything that maps a noisy batch x [B, ...] at noise levels sigma [B] to D(x; sigma)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor: ...


def sigma_vector(sigma: Any, batch: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, name: str = "sigma") -> torch.Tensor:
    """`sigma` as a (batch,) tensor: accepts a float, a 0-d/1-element tensor, or a tensor
    with `batch` elements (e.g. shape [B] or [B, 1, 1, 1])."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a float or a tensor, got {type(sigma).__name__}")
    sigma = torch.as_tensor(sigma, device=device)
    if sigma.is_complex() or sigma.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real tensor, got dtype {sigma.dtype}")
    if sigma.numel() == 1:
        return sigma.reshape(1).to(dtype=dtype, device=device).expand(batch)
    if sigma.numel() != batch or any(s != 1 for s in sigma.shape[1:]):
        raise ValueError(f"{name}: expected 1 or {batch} values (shape [B] or [B, 1, 1, 1]), "
                         f"got shape {tuple(sigma.shape)}")
    return sigma.reshape(batch).to(dtype=dtype, device=device)


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    # (B,) -> (B, 1, ..., 1) broadcastable against a tensor with `ndim` dimensions.
    return v.reshape(-1, *([1] * (ndim - 1)))


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5) -> Coefficients:
    """EDM (Karras et al. 2022, Table 1): unit-variance network input and target.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.
    """
    sd2 = sigma_data ** 2
    var = sigma.square() + sd2
    return Coefficients(c_skip=sd2 / var, c_out=sigma * sigma_data * var.rsqrt(), c_in=var.rsqrt(),
                        c_noise=sigma.log() / 4)


def student_coefficients(t: Any, sigma_max: float = 80.0, sigma_data: float = 0.5) -> StudentCoefficients:
    """Coefficients of PID's boundary-condition parametrization

        x_theta(n, t) = (t / T) n + (1 - t / T) F_theta(c n, c_noise(t), labels),  T = sigma_max,

    with c = 1 / sqrt(sd^2 + T^2) (EDM's c_in at T, since n = T z has variance T^2 + ...).
    At t = T, a = 1 and b = 0, so x(T) = n whatever F is.
    """
    if not (isinstance(sigma_max, (int, float)) and sigma_max > 0):
        raise ValueError(f"student_coefficients: sigma_max must be a positive number, got {sigma_max!r}")
    if not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
        raise ValueError(f"student_coefficients: sigma_data must be a positive number, got {sigma_data!r}")
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1)
        if not t.is_floating_point():
            t = t.float()
    else:
        t = sigma_vector(t, 1, name="t")
    a = t / sigma_max
    c = torch.full_like(t, 1 / math.sqrt(sigma_data ** 2 + sigma_max ** 2))
    return StudentCoefficients(a=a, b=1 - a, c=c)


# ----------------------------------------------------------------------------------------
# Preconditioning wrappers around a raw network F(x_in, c_noise, class_labels).

# EDM's sigma range, PID's default for teachers without a trained range of their own
PID_SIGMA_MIN, PID_SIGMA_MAX = 0.002, 80.0


class Preconditioning(nn.Module):
    """Base class: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels).

    `model` is any module or callable F(x_in, c_noise, class_labels) (e.g. a SongUNet).
    Subclasses implement `coefficients(sigma)`. The wrapped network runs in fp32, or
    fp16 on CUDA when `use_fp16` is set; D is returned in fp32 (as in EDM).
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def __init__(self, model: Callable[..., torch.Tensor] | None, *, label_dim: int = 0, use_fp16: bool = False):
        super().__init__()
        # model=None is only for subclasses that override `raw` (the direct denoisers).
        if model is None and type(self).raw is Preconditioning.raw:
            raise TypeError(f"{type(self).__name__}: model must be callable F(x_in, c_noise, class_labels), got None")
        if model is not None and not callable(model):
            raise TypeError(f"{type(self).__name__}: model must be callable F(x_in, c_noise, class_labels), "
                            f"got {type(model).__name__}")
        if not isinstance(label_dim, int) or label_dim < 0:
            raise ValueError(f"{type(self).__name__}: label_dim must be a non-negative int, got {label_dim!r}")
        self.model = model
        self.label_dim = label_dim
        self.use_fp16 = bool(use_fp16)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        raise NotImplementedError

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def pid_sigma_range(self) -> tuple[float, float]:
        """The sigma range PID trains on by default: EDM's 0.002 .. 80 within the range this
        teacher declares ([sigma_min, sigma_max]: unbounded for EDM's preconditioning, [0.02, 100]
        for VE, ...). Teachers trained on a discrete schedule override it with their trained range."""
        return max(PID_SIGMA_MIN, self.sigma_min), min(PID_SIGMA_MAX, self.sigma_max)

    def model_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        return torch.float16 if (self.use_fp16 and not force_fp32 and device.type == "cuda") else torch.float32

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
            force_fp32: bool = False) -> torch.Tensor:
        """F(x_in, c_noise, labels) in fp32, run in the model's dtype."""
        dtype = self.model_dtype(x_in.device, force_fp32)
        labels = self._labels(class_labels, x_in.shape[0], x_in.device)
        out = self.model(x_in.to(dtype), c_noise.to(torch.float32).reshape(-1), labels)
        return out.to(torch.float32)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False) -> torch.Tensor:
        x = _check_batch(x, type(self).__name__).to(torch.float32)
        sigma = sigma_vector(sigma, x.shape[0], device=x.device)
        c = self.coefficients(sigma)
        F_x = self.raw(_per_sample(c.c_in, x.ndim) * x, c.c_noise, class_labels, force_fp32)
        return _per_sample(c.c_skip, x.ndim) * x + _per_sample(c.c_out, x.ndim) * F_x

    def _labels(self, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        # Unconditional models get None; conditional ones a float [B, label_dim] one-hot
        # matrix (integer class indices are accepted and converted; None -> zeros).
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        if not isinstance(class_labels, torch.Tensor):
            raise TypeError(f"class_labels: expected a tensor, got {type(class_labels).__name__}")
        if not class_labels.is_floating_point():
            if class_labels.shape != (batch,):
                raise ValueError(f"class_labels: integer labels must have shape [{batch}], "
                                 f"got {tuple(class_labels.shape)}")
            return nn.functional.one_hot(class_labels.long(), self.label_dim).to(torch.float32)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def extra_repr(self) -> str:
        return f"label_dim={self.label_dim}, use_fp16={self.use_fp16}"


class EDMPrecond(Preconditioning):
    """EDM preconditioning (see `edm_coefficients`)."""

    def __init__(self, model: Callable[..., torch.Tensor], *, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.0, sigma_max: float = math.inf, sigma_data: float = 0.5):
        super().__init__(model, label_dim=label_dim, use_fp16=use_fp16)
        if not sigma_data > 0:
            raise ValueError(f"EDMPrecond: sigma_data must be positive, got {sigma_data!r}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(Preconditioning):
    """Variance-preserving (DDPM / Song et al.) preconditioning; F predicts the noise.

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), and with x = x_0 + sigma eps:
    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma).
    """

    def __init__(self, model: Callable[..., torch.Tensor], *, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5):
        super().__init__(model, label_dim=label_dim, use_fp16=use_fp16)
        self.beta_d = float(beta_d)
        self.beta_min = float(beta_min)
        self.M = int(M)
        self.epsilon_t = float(epsilon_t)
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t: Any) -> torch.Tensor:
        # expm1 in fp64: exp(x) - 1 in fp32 loses most digits at t = epsilon_t (EDM's
        # sigma_min comes out as 0.000977 instead of 0.0010005).
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t).sqrt()

    def sigma_inv(self, sigma: Any) -> torch.Tensor:
        # Solve beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2) for t >= 0.
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return Coefficients(c_skip=torch.ones_like(sigma), c_out=-sigma, c_in=(sigma.square() + 1).rsqrt(),
                            c_noise=(self.M - 1) * self.sigma_inv(sigma))


class VEPrecond(Preconditioning):
    """Variance-exploding (NCSN / Song et al.) preconditioning.

    c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2).
    """

    def __init__(self, model: Callable[..., torch.Tensor], *, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(model, label_dim=label_dim, use_fp16=use_fp16)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return Coefficients(c_skip=torch.ones_like(sigma), c_out=sigma.clone(), c_in=torch.ones_like(sigma),
                            c_noise=(0.5 * sigma).log())


PRECONDITIONINGS: dict[str, type[Preconditioning]] = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}


# ----------------------------------------------------------------------------------------
# Denoisers given directly as D(x, sigma, labels).

class DirectDenoiser(Preconditioning):
    """Base of denoisers given directly as D(x, sigma, labels): identity coefficients
    c_skip = 0, c_out = 1, c_in = 1, c_noise = sigma, so that raw(x, sigma, labels) = D.
    Subclasses implement `denoise`; x keeps the caller's dtype (e.g. fp64 in reference
    solutions) and sigma arrives as a (B,) tensor of that dtype."""

    def __init__(self, *, label_dim: int = 0, sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__(None, label_dim=label_dim)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        zero, one = torch.zeros_like(sigma), torch.ones_like(sigma)
        return Coefficients(c_skip=zero, c_out=one, c_in=one.clone(), c_noise=sigma.clone())

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
            force_fp32: bool = False) -> torch.Tensor:
        out = self.denoise(x_in, c_noise.to(x_in.dtype).reshape(-1), class_labels)
        if not isinstance(out, torch.Tensor) or out.shape != x_in.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{type(self).__name__}: denoiser output must have shape {tuple(x_in.shape)}, "
                             f"got {got}")
        return out

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False) -> torch.Tensor:
        x = _check_batch(x, type(self).__name__)
        sigma = sigma_vector(sigma, x.shape[0], device=x.device, dtype=x.dtype)
        return self.raw(x, sigma, class_labels)


class FunctionDenoiser(DirectDenoiser):
    """Adapts any callable D(x, sigma, labels) (e.g. a user's own teacher) to the
    Preconditioning interface. The callable's output must have x's shape."""

    def __init__(self, fn: Callable[..., torch.Tensor], *, label_dim: int = 0,
                 sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__(label_dim=label_dim, sigma_min=sigma_min, sigma_max=sigma_max)
        if not callable(fn):
            raise TypeError(f"FunctionDenoiser: fn must be callable D(x, sigma, class_labels), "
                            f"got {type(fn).__name__}")
        self.fn = fn

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        return self.fn(x, sigma, class_labels)


class GaussianDenoiser(DirectDenoiser):
    """The ideal denoiser of data ~ N(mean, std^2 I), in closed form.

    With x = x_0 + sigma eps, E[x_0 | x] = (std^2 x + sigma^2 mean) / (std^2 + sigma^2).
    Its probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma = sigma (x - mean) / (std^2 + sigma^2)
    integrates to x(sigma) - mean = (x(sigma0) - mean) sqrt(std^2 + sigma^2) / sqrt(std^2 + sigma0^2),
    which `ode_solution` returns: an exact reference for samplers and for PID.

    `mean` is a float or a tensor broadcastable to one sample's shape; `std` a positive
    float (or a tensor broadcastable likewise, for a diagonal covariance).
    """

    def __init__(self, mean: Any = 0.0, std: Any = 0.5, *, label_dim: int = 0):
        super().__init__(label_dim=label_dim)
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        if not bool((std > 0).all()):
            raise ValueError(f"GaussianDenoiser: std must be positive, got {std}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        var = self.std.to(x.dtype).square()
        sigma2 = _per_sample(sigma.to(x.dtype), x.ndim).square()
        return (var * x + sigma2 * self.mean.to(x.dtype)) / (var + sigma2)

    def ode_solution(self, x_start: torch.Tensor, sigma_start: Any, sigma_end: Any) -> torch.Tensor:
        """Exact PF-ODE solution x(sigma_end) from x(sigma_start) = x_start."""
        x_start = _check_batch(x_start, "GaussianDenoiser.ode_solution")
        batch, ndim = x_start.shape[0], x_start.ndim
        s0 = sigma_vector(sigma_start, batch, device=x_start.device, dtype=x_start.dtype, name="sigma_start")
        s1 = sigma_vector(sigma_end, batch, device=x_start.device, dtype=x_start.dtype, name="sigma_end")
        var = self.std.to(x_start.dtype).square()
        mean = self.mean.to(x_start.dtype)
        ratio = (var + _per_sample(s1, ndim).square()) / (var + _per_sample(s0, ndim).square())
        return mean + (x_start - mean) * ratio.sqrt()

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Exact data samples of the given shape [B, ...]."""
        eps = torch.randn(shape, generator=generator, dtype=torch.float64, device=self.mean.device)
        return (self.mean + self.std * eps).to(dtype)


# NVlabs/edm's preconditioning classes (and edm2's Precond, EDM's preconditioning of an EDM2
# UNet) by class name: pid_fast's class and the hyper-parameters read from the object.
_EDM_OBJECTS: dict[str, tuple[type[Preconditioning], str, tuple[str, ...]]] = {
    "EDMPrecond": (EDMPrecond, "model", ("sigma_min", "sigma_max", "sigma_data")),
    "VPPrecond": (VPPrecond, "model", ("beta_d", "beta_min", "M", "epsilon_t")),
    "VEPrecond": (VEPrecond, "model", ("sigma_min", "sigma_max")),
    "Precond": (EDMPrecond, "unet", ("sigma_data",)),  # edm2
}


def edm_preconditioning(obj: Any) -> Preconditioning | None:
    """pid_fast's preconditioning of an object of NVlabs/edm's EDMPrecond, VPPrecond or VEPrecond
    (or edm2's Precond), sharing the object's network and hyper-parameters (sigma_data, ...);
    None for anything else (pid_fast's own classes included). Recognised by class name and
    attributes, so the object's class need not be importable (a snapshot's persistent class)."""
    if isinstance(obj, Preconditioning) or not isinstance(obj, nn.Module):
        return None
    entry = _EDM_OBJECTS.get(type(obj).__name__)
    if entry is None:
        return None
    cls, network_attr, fields = entry
    network = getattr(obj, network_attr, None)
    if not isinstance(network, nn.Module) or any(not hasattr(obj, f) for f in fields):
        return None
    kwargs = {f: (int(getattr(obj, f)) if f == "M" else float(getattr(obj, f))) for f in fields}
    return cls(network, label_dim=int(getattr(obj, "label_dim", 0)), use_fp16=bool(getattr(obj, "use_fp16", False)),
               **kwargs)


def declared_sigma_data(obj: Any) -> float | None:
    """The sigma_data an object declares (an EDM/pid_fast preconditioning, or the function a
    FunctionDenoiser adapts), None when it declares none."""
    if isinstance(obj, FunctionDenoiser):
        return declared_sigma_data(obj.fn)
    value = getattr(obj, "sigma_data", None)
    if isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
        return float(value)
    return None


def as_denoiser(obj: Any, *, precond: str | None = None, label_dim: int = 0, **precond_kwargs: Any) -> Preconditioning:
    """A Preconditioning from whatever the user has:

    - a Preconditioning: returned as is;
    - an object of NVlabs/edm's preconditioning classes: pid_fast's equivalent around its network
      (``edm_preconditioning``), so its sigma_data and noise-label rule are used;
    - a raw network F(x_in, c_noise, labels) with `precond` in {'edm', 'vp', 've'}: wrapped;
    - any other callable D(x, sigma, labels): adapted by FunctionDenoiser.
    """
    if isinstance(obj, Preconditioning):
        if precond is not None:
            raise ValueError("as_denoiser: obj is already preconditioned; do not pass precond")
        return obj
    if not callable(obj):
        raise TypeError(f"as_denoiser: obj must be callable, got {type(obj).__name__}")
    if precond is None:
        edm = edm_preconditioning(obj) if not precond_kwargs and not label_dim else None
        return edm if edm is not None else FunctionDenoiser(obj, label_dim=label_dim, **precond_kwargs)
    if precond not in PRECONDITIONINGS:
        raise ValueError(f"as_denoiser: precond must be one of {sorted(PRECONDITIONINGS)}, got {precond!r}")
    return PRECONDITIONINGS[precond](obj, label_dim=label_dim, **precond_kwargs)


def _check_batch(x: Any, who: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{who}: x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    return x
