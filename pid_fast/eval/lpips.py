"""LPIPS as the PID norm, through the `lpips` package (Zhang et al. 2018), offline.

The reference PID code compares pred and target with LPIPS after bilinear resizing to
224 x 224 and mapping [-1, 1] to [0, 1]. Here:

    d(pred, target) = LPIPS(resize(pred), resize(target))   per sample, float32 (B,)

The `lpips` package would fetch the backbone (VGG16 / AlexNet / SqueezeNet ImageNet weights)
from the torchvision servers; this wrapper never does: the backbone is built with random
weights and then loaded from a file the user gives. The linear calibration layers ship with
the `lpips` package itself (or come from the same file when it is a full LPIPS state_dict).

Accepted weight files (``torch.load``-able state_dicts, read with weights_only=True):
- a torchvision model state_dict, e.g. vgg16-397923af.pth or alexnet-owt-7be5be79.pth
  (keys ``features.<i>.*``; the classifier is ignored);
- a full ``lpips.LPIPS`` state_dict (keys ``net.slice<k>.<i>.*`` and ``lin<k>.*``).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LPIPSNorm", "LPIPS_NETS"]

LPIPS_NETS = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth",
              "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def _load_state_dict(path: str, what: str) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several types for a bad file
        raise ValueError(f"{what}: {path!r} is not a readable torch state_dict file ({exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{what}: {path!r} does not hold a state_dict of tensors")
    return sd


class LPIPSNorm(nn.Module):
    """Per-sample LPIPS distance (B,) float32 (float64 for float64 inputs) between two image batches in [-1, 1].

    weights: path of the backbone weights (see the module docstring); required, nothing is
        downloaded. net: "vgg" (the reference's choice), "alex" or "squeeze".
    lin_weights: the calibration layers (default: the file shipped in the lpips package, or
        the lin layers of ``weights`` when it is a full LPIPS state_dict).
    resize: side length both images are bilinearly resized to (224 as in the reference;
        None keeps the input size).
    The module is frozen (eval mode, no parameter gradients); gradients flow to its inputs.
    """

    def __init__(self, weights: Optional[str | os.PathLike], net: str = "vgg",
                 lin_weights: Optional[str | os.PathLike] = None, resize: Optional[int] = 224):
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"net must be one of {tuple(LPIPS_NETS)}, got {net!r}")
        if weights is None:
            raise ValueError(f"weights: LPIPS needs the {net} backbone weights as a local file (nothing is "
                             f"downloaded); pass the path of e.g. torchvision's {LPIPS_NETS[net]}")
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights: LPIPS backbone weights not found at {weights!r}; download "
                                    f"torchvision's {LPIPS_NETS[net]} on a machine with internet access "
                                    f"and pass its local path")
        if lin_weights is not None and not os.path.isfile(os.fspath(lin_weights)):
            raise FileNotFoundError(f"lin_weights: LPIPS calibration weights not found at "
                                    f"{os.fspath(lin_weights)!r}")
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 16):
            raise ValueError(f"resize must be an int >= 16 or None, got {resize!r}")
        try:
            import lpips
        except ImportError as exc:  # pragma: no cover - lpips is a dependency of the LPIPS norm
            raise ImportError("norm='lpips' needs the lpips package: pip install lpips") from exc

        sd = _load_state_dict(weights, "weights")
        full = any(k.startswith("net.slice") for k in sd)
        has_lin = any(k.startswith("lin") for k in sd)
        # pnet_rand=True: the backbone starts random, so torchvision downloads nothing.
        # pretrained=True loads the calibration layers from lin_weights or the package's file.
        with warnings.catch_warnings():  # torchvision's deprecation notice for pretrained=False
            warnings.simplefilter("ignore")
            self.model = lpips.LPIPS(pretrained=not (full and has_lin and lin_weights is None), net=net,
                                     pnet_rand=True, verbose=False,
                                     model_path=None if lin_weights is None else os.fspath(lin_weights))
        self._load_backbone(sd, full, weights)
        self.model.eval().requires_grad_(False)
        self.net, self.resize = net, resize

    def _load_backbone(self, sd: dict, full: bool, path: str) -> None:
        model_sd = self.model.state_dict()
        if full:
            wanted = {k: v for k, v in sd.items() if k.startswith(("net.", "lin"))}
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
            raise ValueError(f"weights: {path!r} does not hold the LPIPS {self.model.pnet_type} backbone: "
                             f"{len(missing)} of {len(backbone)} tensors missing (e.g. {missing[:3]}); expected "
                             f"a torchvision {self.model.pnet_type} state_dict or a full lpips.LPIPS state_dict")
        bad = [k for k, v in wanted.items() if k in model_sd and v.shape != model_sd[k].shape]
        if bad:
            raise ValueError(f"weights: {path!r} has tensors of the wrong shape for LPIPS "
                             f"{self.model.pnet_type}: {bad[:3]}")
        self.model.load_state_dict({k: v for k, v in wanted.items() if k in model_sd}, strict=False)

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
        # [-1, 1] -> [0, 1] as in the reference, and normalize=True maps it back to the [-1, 1]
        # range the lpips package expects: together the identity, written as the reference does.
        d = self.model((pred + 1) / 2, (target + 1) / 2, normalize=True)
        return d.reshape(pred.shape[0]).to(torch.float64 if d.dtype == torch.float64 else torch.float32)

    def extra_repr(self) -> str:
        return f"net={self.net!r}, resize={self.resize}"
