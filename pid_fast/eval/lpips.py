"""LPIPS as the PID norm, offline: the reference's average-pool VGG16, or the `lpips` package.

    d(pred, target) = LPIPS(resize(pred), resize(target))   per sample, float32 (B,)

Two poolings (``LPIPSNorm(pooling=...)``):

- "avg", the reference's (PID's code calls ``piq.LPIPS(replace_pooling=True, reduction="none")``,
  piq 0.7.0; its LPIPS code is the same in 0.8.0). Written here in plain PyTorch, step by step
  as piq computes it:
    1. bilinear resize to 224 x 224 (align_corners=False, no antialias), then [-1, 1] -> [0, 1]
       (the reference resizes only images under 256 pixels wide: the same for its 32 and 64);
    2. (x - ImageNet mean) / ImageNet std, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225);
    3. torchvision's VGG16 convolutions with every 2x2 max-pool replaced by a 2x2 average pool,
       features taken after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
    4. each feature unit-normalised over channels: f / (sqrt(sum_c f^2) + 1e-10);
    5. d = sum over layers and channels of w_c * mean over H, W of (f_pred - f_target)^2, with w
       the learned LPIPS heads (the 1x1 "lin" layers of LPIPS v0.1, VGG).
  One deliberate difference: where a feature vector is exactly zero, sqrt's derivative makes
  piq's input gradient NaN; here the squared norm is clamped at 1e-30 first, which leaves every
  value unchanged (the normalised vector is zero either way) and gives a finite gradient.
- "max", the `lpips` package's network (max pooling, its own rounded [-1, 1] scaling layer),
  for net "vgg", "alex" or "squeeze" (the only choice for the last two).

Default: "avg" for net="vgg" (both reference configs), "max" for "alex" and "squeeze".

Weight files: nothing is ever downloaded; every file is a local path read with
``torch.load(weights_only=True)``. For the reference's LPIPS (net="vgg", pooling="avg") a user needs

1. the VGG16 ImageNet backbone, torchvision's ``vgg16-397923af.pth`` (528 MB). Once, on a machine
   with internet access:
       wget https://download.pytorch.org/models/vgg16-397923af.pth
   (or ``python -c "import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')"``,
   which leaves it in ~/.cache/torch/hub/checkpoints/). Pass it as ``weights=`` (config key
   ``loss.lpips_weights``). Keys ``features.<i>.*`` are used, the classifier is ignored; a full
   ``lpips.LPIPS`` state_dict (keys ``net.slice<k>.<i>.*``, ``lin<k>.model.1.weight``) also works.
2. the LPIPS linear heads (VGG, v0.1), either file:
   - piq's ``lpips_weights.pt``, the file the reference loads (a sequence of 5 tensors, as piq reads it):
       wget https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/lpips_weights.pt
   - the `lpips` package's ``lpips/weights/v0.1/vgg.pth`` (keys ``lin<k>.model.1.weight``); it
     ships inside ``pip install lpips``, so nothing needs downloading. piq's file is meant to hold
     these same v0.1 VGG heads (not checked offline); pass piq's file to use exactly the reference's.
   Pass it as ``lin_weights=``. When it is not given, the heads come from ``weights`` if that is
   a full LPIPS state_dict, else from the installed lpips package's vgg.pth.
For pooling="max" the backbone file is the torchvision state_dict of the chosen net
(vgg16-397923af.pth, alexnet-owt-7be5be79.pth, squeezenet1_1-b8a52dc0.pth) and the heads default
to the lpips package's file for that net.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from pid_fast.checks import check_choice

__all__ = ["LPIPSNorm", "LPIPS_NETS", "LPIPS_POOLINGS", "AvgPoolVGG16LPIPS"]

LPIPS_NETS = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth",
              "squeeze": "squeezenet1_1-b8a52dc0.pth"}
LPIPS_POOLINGS = ("avg", "max")

# torchvision's vgg16().features up to relu5_3: out channels per conv, "pool" for a 2x2 pool.
# Indices of the Sequential built from it equal torchvision's, so its keys load unchanged.
_VGG16_PLAN = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_HEAD_CHANNELS = (64, 128, 256, 512, 512)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_NORM_EPS = 1e-10  # added to the channel norm, as in piq and lpips
_NORM_SQ_FLOOR = 1e-30  # keeps sqrt's gradient finite at a zero feature vector (see module docstring)


def _torch_load(path: str, what: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several types for a bad file
        raise ValueError(f"{what}: {path!r} is not a readable torch state_dict file ({exc})") from None


def _load_state_dict(path: str, what: str) -> dict:
    sd = _torch_load(path, what)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{what}: {path!r} does not hold a state_dict of tensors")
    return sd


def _read_heads(obj: object, path: str) -> list:
    """The 5 VGG LPIPS heads as (1, C, 1, 1) tensors from piq's list or an lpips-style state_dict."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, (list, tuple)):  # piq's lpips_weights.pt
        heads = list(obj)
    elif isinstance(obj, dict):  # lin<k>.model.1.weight (lpips), lin<k>.weight or lin<k>
        by_layer = {}
        for key, value in obj.items():
            match = re.fullmatch(r"lin(\d)(?:\.model\.1)?(?:\.weight)?", str(key))
            if match:
                by_layer[int(match.group(1))] = value
        heads = [by_layer.get(k) for k in range(len(_HEAD_CHANNELS))]
    else:
        heads = []
    ok = len(heads) == len(_HEAD_CHANNELS) and all(
        isinstance(h, torch.Tensor) and h.numel() == c for h, c in zip(heads, _HEAD_CHANNELS))
    if not ok:
        raise ValueError(f"lin_weights: {path!r} does not hold the 5 LPIPS VGG heads (channels "
                         f"{_HEAD_CHANNELS}); expected piq's lpips_weights.pt or the lpips package's "
                         f"weights/v0.1/vgg.pth")
    return [h.detach().reshape(1, -1, 1, 1) for h in heads]


def _lpips_package_heads_file() -> Optional[str]:
    """The VGG heads file inside the installed lpips package, without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth")
    return path if os.path.isfile(path) else None


class AvgPoolVGG16LPIPS(nn.Module):
    """piq's LPIPS(replace_pooling=True) on images in [0, 1]: (x, y) -> per-sample distance (B,).

    Frozen: load_backbone / load_heads fill it, no parameter takes gradients."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for step in _VGG16_PLAN:
            if step == "pool":
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, step, kernel_size=3, padding=1), nn.ReLU()]
                channels = step
        self.features = nn.Sequential(*layers)
        for k, c in enumerate(_HEAD_CHANNELS):
            self.register_parameter(f"lin{k}", nn.Parameter(torch.zeros(1, c, 1, 1)))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def load_backbone(self, sd: dict, path: str) -> None:
        # torchvision: features.<i>.<name>; full lpips.LPIPS: net.slice<k>.<i>.<name> (same <i>).
        renamed = {}
        for key, value in sd.items():
            match = re.fullmatch(r"net\.slice\d\.(\d+\.\w+)", key)
            renamed[f"features.{match.group(1)}" if match else key] = value
        wanted = self.features.state_dict()
        missing = [f"features.{k}" for k in wanted if f"features.{k}" not in renamed]
        if missing:
            raise ValueError(f"weights: {path!r} does not hold the VGG16 backbone: {len(missing)} of "
                             f"{len(wanted)} tensors missing (e.g. {missing[:3]}); expected torchvision's "
                             f"vgg16 state_dict (vgg16-397923af.pth) or a full lpips.LPIPS vgg state_dict")
        bad = [k for k, v in wanted.items() if renamed[f"features.{k}"].shape != v.shape]
        if bad:
            raise ValueError(f"weights: {path!r} has tensors of the wrong shape for the VGG16 backbone: "
                             f"{bad[:3]}")
        self.features.load_state_dict({k: renamed[f"features.{k}"] for k in wanted})

    def load_heads(self, heads: list) -> None:
        for k, head in enumerate(heads):
            getattr(self, f"lin{k}").copy_(head)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = (torch.cat([x, y]) - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # one pass for both
        per_layer = []
        for index, module in enumerate(self.features):
            h = module(h)
            if index in _VGG16_TAPS:
                per_layer.append(self._layer_distance(h, getattr(self, f"lin{len(per_layer)}"), batch))
        # sum_c w_c mean_hw(...) per layer, summed over layers: piq's cat(...).sum(1).
        return torch.cat(per_layer, dim=1).sum(dim=1)

    @staticmethod
    def _layer_distance(features: torch.Tensor, head: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, C): head_c * mean over H, W of the squared difference of unit-normalised features."""
        if features.dtype in (torch.float16, torch.bfloat16):
            features = features.float()  # norms and squared differences in fp32 (as autocast would)
        norm = torch.sqrt(torch.sum(features ** 2, dim=1, keepdim=True).clamp_min(_NORM_SQ_FLOOR))
        unit = features / (norm + _NORM_EPS)
        diff = (unit[:batch] - unit[batch:]) ** 2
        return (diff * head.to(diff.dtype)).mean(dim=(2, 3))


class LPIPSNorm(nn.Module):
    """Per-sample LPIPS distance (B,) float32 (float64 for float64 inputs) between two image batches in [-1, 1].

    weights: path of the backbone weights (see the module docstring); required, nothing is
        downloaded. net: "vgg" (the reference's choice), "alex" or "squeeze".
    lin_weights: path of the LPIPS linear heads (default: the lin layers of ``weights`` when it is
        a full LPIPS state_dict, else the file shipped in the lpips package).
    resize: side length both images are bilinearly resized to (224 as in the reference;
        None keeps the input size).
    pooling: "avg" (the reference's piq LPIPS, VGG only) or "max" (the lpips package's network);
        None picks "avg" for net="vgg" and "max" for "alex" and "squeeze".
    The module is frozen (eval mode, no parameter gradients); gradients flow to its inputs.
    """

    def __init__(self, weights: Optional[str | os.PathLike], net: str = "vgg",
                 lin_weights: Optional[str | os.PathLike] = None, resize: Optional[int] = 224,
                 pooling: Optional[str] = None):
        super().__init__()
        check_choice(net, "net", tuple(LPIPS_NETS))
        if pooling is None:
            pooling = "avg" if net == "vgg" else "max"
        check_choice(pooling, "pooling", LPIPS_POOLINGS)
        if pooling == "avg" and net != "vgg":
            raise ValueError(f"pooling='avg' (the reference's piq LPIPS) exists only for net='vgg', got "
                             f"net={net!r}; use pooling='max' for the lpips package's {net}")
        if weights is None:
            raise ValueError(f"weights: LPIPS needs the {net} backbone weights as a local file (nothing is "
                             f"downloaded); pass the path of e.g. torchvision's {LPIPS_NETS[net]}")
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights: LPIPS backbone weights not found at {weights!r}; download "
                                    f"torchvision's {LPIPS_NETS[net]} on a machine with internet access "
                                    f"and pass its local path")
        lin_weights = None if lin_weights is None else os.fspath(lin_weights)
        if lin_weights is not None and not os.path.isfile(lin_weights):
            raise FileNotFoundError(f"lin_weights: LPIPS calibration weights not found at {lin_weights!r}")
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 16):
            raise ValueError(f"resize must be an int >= 16 or None, got {resize!r}")
        sd = _load_state_dict(weights, "weights")
        if pooling == "avg":
            self.model = self._build_avg(sd, weights, lin_weights)
        else:
            self.model = self._build_lpips_package(sd, weights, lin_weights, net)
        self.model.eval().requires_grad_(False)
        self.net, self.resize, self.pooling = net, resize, pooling

    @staticmethod
    def _build_avg(sd: dict, path: str, lin_weights: Optional[str]) -> AvgPoolVGG16LPIPS:
        model = AvgPoolVGG16LPIPS()
        model.load_backbone(sd, path)
        if lin_weights is not None:
            heads = _read_heads(_torch_load(lin_weights, "lin_weights"), lin_weights)
        elif any(re.fullmatch(r"lin\d.*", k) for k in sd):
            heads = _read_heads(sd, path)
        else:
            package_file = _lpips_package_heads_file()
            if package_file is None:
                raise ValueError("lin_weights: LPIPS needs its linear heads as a local file: pass piq's "
                                 "lpips_weights.pt or the lpips package's weights/v0.1/vgg.pth (or install "
                                 "the lpips package, which ships the latter)")
            heads = _read_heads(_torch_load(package_file, "lin_weights"), package_file)
        model.load_heads(heads)
        return model

    @staticmethod
    def _build_lpips_package(sd: dict, path: str, lin_weights: Optional[str], net: str) -> nn.Module:
        try:
            import lpips
        except ImportError as exc:  # pragma: no cover - lpips is a dependency of the LPIPS norm
            raise ImportError("LPIPS with pooling='max' needs the lpips package: pip install lpips") from exc
        full = any(k.startswith("net.slice") for k in sd)
        lin_sd = None  # heads from lin_weights or from a full state_dict; None: the package's file
        if lin_weights is not None:
            obj = _torch_load(lin_weights, "lin_weights")
            if isinstance(obj, (list, tuple)) and net == "vgg":  # piq's lpips_weights.pt
                lin_sd = {f"lin{k}.model.1.weight": h for k, h in enumerate(_read_heads(obj, lin_weights))}
            elif isinstance(obj, dict):
                lin_sd = {k: v for k, v in obj.items() if isinstance(k, str) and k.startswith("lin")}
            else:
                lin_sd = {}
        elif full and any(k.startswith("lin") for k in sd):
            lin_sd = {k: v for k, v in sd.items() if k.startswith("lin")}
        # pnet_rand=True: the backbone starts random, so torchvision downloads nothing.
        # pretrained=True loads the calibration layers from the package's own file.
        with warnings.catch_warnings():  # torchvision's deprecation notice for pretrained=False
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(pretrained=lin_sd is None, net=net, pnet_rand=True, verbose=False)
        model_sd = model.state_dict()
        if lin_sd is not None:
            heads = [k for k in model_sd if re.match(r"lin\d", k)]  # lins.<k> aliases the same tensors
            if any(not isinstance(lin_sd.get(k), torch.Tensor) or lin_sd[k].shape != model_sd[k].shape
                   for k in heads):
                source = lin_weights if lin_weights is not None else path
                raise ValueError(f"lin_weights: {source!r} does not hold the LPIPS {net} heads "
                                 f"({', '.join(heads)}); expected the lpips package's weights/v0.1/{net}.pth"
                                 + (" or piq's lpips_weights.pt" if net == "vgg" else ""))
        if full:
            wanted = {k: v for k, v in sd.items() if k.startswith("net.")}
        else:
            # torchvision layout features.<i>.* -> LPIPS's net.slice<k>.<i>.* (same <i>).
            by_index = {}
            for key in model_sd:
                if key.startswith("net.slice"):
                    _, _, idx, name = key.split(".", 3)
                    by_index[f"features.{idx}.{name}"] = key
            wanted = {by_index[k]: v for k, v in sd.items() if k in by_index}
        backbone = [k for k in model_sd if k.startswith("net.")]
        missing = [k for k in backbone if k not in wanted]
        if missing:
            raise ValueError(f"weights: {path!r} does not hold the LPIPS {model.pnet_type} backbone: "
                             f"{len(missing)} of {len(backbone)} tensors missing (e.g. {missing[:3]}); expected "
                             f"a torchvision {model.pnet_type} state_dict or a full lpips.LPIPS state_dict")
        bad = [k for k, v in wanted.items() if k in model_sd and v.shape != model_sd[k].shape]
        if bad:
            raise ValueError(f"weights: {path!r} has tensors of the wrong shape for LPIPS "
                             f"{model.pnet_type}: {bad[:3]}")
        wanted.update(lin_sd or {})
        model.load_state_dict({k: v for k, v in wanted.items() if k in model_sd}, strict=False)
        return model

    def train(self, mode: bool = True) -> "LPIPSNorm":
        super().train(mode)
        self.model.eval()  # a fixed metric: its dropout layers stay off
        return self

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}")
        if pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(f"LPIPS takes RGB images (B, 3, H, W), got shape {tuple(pred.shape)}")
        if self.resize is not None and pred.shape[-2:] != (self.resize, self.resize):
            size = (self.resize, self.resize)
            pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=size, mode="bilinear", align_corners=False)
        # [-1, 1] -> [0, 1] as in the reference. For "max", normalize=True maps it back to the
        # [-1, 1] range the lpips package expects: together the identity, written as the reference does.
        if self.pooling == "avg":
            d = self.model((pred + 1) / 2, (target + 1) / 2)
        else:
            d = self.model((pred + 1) / 2, (target + 1) / 2, normalize=True)
        return d.reshape(pred.shape[0]).to(torch.float64 if d.dtype == torch.float64 else torch.float32)

    def extra_repr(self) -> str:
        return f"net={self.net!r}, pooling={self.pooling!r}, resize={self.resize}"
