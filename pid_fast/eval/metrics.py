"""Quality metrics: Frechet distance and KID through clean-fid's own functions
(``cleanfid.fid.frechet_distance``, ``cleanfid.fid.kernel_distance``), on features from

- the bundled digits feature network (``pid_fast.eval.digits.DigitsClassifier``): the offline
  "digits FD" of the embedded default and of ``pid-fast demo``;
- clean-fid's ``legacy_tensorflow`` Inception (the TF-ported Inception-v3 torchscript file
  ``inception-2015-12-05.pt``, which resizes to 299x299 inside, as TF did), read from a local
  path the user gives: FID as the PID reference code computes it, on unquantised float images
  scaled to [0, 255]. Nothing here downloads; a missing weights file raises FileNotFoundError.

Image batches are float tensors [B, C, H, W] in [-1, 1] throughout.

The distance of a one-step student to its teacher (``TeacherDistance``) comes first wherever a
student is scored: the FD between the student's samples and the teacher's multi-step samples
from the same noise and labels (0 for the teacher itself), and the per-pixel RMSE (optionally
LPIPS) of each student sample to the teacher's sample from its noise. The FD to the data stays
beside it: on its own it cannot tell a closer copy of the teacher from a lucky deviation.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Optional

import numpy as np
import torch

from pid_fast.checks import check_int

__all__ = [
    "feature_statistics", "frechet_distance", "fd_from_features", "kernel_distance", "DigitsFeatures",
    "digits_reference_features", "digits_fd", "INCEPTION_FILENAME", "load_inception", "InceptionFeatures",
    "load_reference_stats", "save_reference_stats", "load_images", "features_of", "rmse_to_reference",
    "TeacherDistance",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"  # clean-fid's name for the TF-ported Inception


# ============================================================================================
# Statistics and distances (clean-fid's implementations)

def _as_features(feats: Any, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().double().numpy()
    if not isinstance(feats, np.ndarray):
        raise TypeError(f"{name}: expected a [num, dim] array or tensor, got {type(feats).__name__}")
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{name}: expected a [num, dim] array with num >= 2, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name}: features contain NaN or infinity")
    return feats.astype(np.float64, copy=False)


def feature_statistics(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean [dim], covariance [dim, dim]) in float64, as clean-fid computes them
    (np.cov with rowvar=False: the unbiased N - 1 estimate)."""
    feats = _as_features(feats, "feats")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): clean-fid's ``frechet_distance``."""
    from cleanfid.fid import frechet_distance as cf_frechet_distance

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1, mu2: expected vectors of the same length, got shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name}: expected a [{d}, {d}] covariance, got shape {s.shape}")
    return float(cf_frechet_distance(mu1, sigma1, mu2, sigma2))


def fd_from_features(feats: Any, ref: Any) -> float:
    """Frechet distance between the Gaussians fitted to ``feats`` and to ``ref`` (features
    [num, dim] or a precomputed (mu, sigma) pair)."""
    mu1, s1 = feature_statistics(feats)
    mu2, s2 = ref if isinstance(ref, tuple) else feature_statistics(ref)
    return frechet_distance(mu1, s1, mu2, s2)


def kernel_distance(feats1: Any, feats2: Any, *, num_subsets: int = 100, max_subset_size: int = 1000,
                    seed: int = 0) -> float:
    """KID (unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets):
    clean-fid's ``kernel_distance``, made deterministic by running it under ``seed`` (it draws
    its subsets from NumPy's global generator, whose state is restored afterwards)."""
    from cleanfid.fid import kernel_distance as cf_kernel_distance

    f1, f2 = _as_features(feats1, "feats1"), _as_features(feats2, "feats2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feats1, feats2: feature dimensions differ ({f1.shape[1]} vs {f2.shape[1]})")
    check_int(num_subsets, "num_subsets")
    check_int(max_subset_size, "max_subset_size")
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(cf_kernel_distance(f1, f2, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def _check_images(images: Any, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a float tensor [B, C, H, W] in [-1, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{name}: expected shape [B, C, H, W] with B >= 1, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor in [-1, 1], got dtype {images.dtype} "
                        f"(convert uint8 images with x / 127.5 - 1)")
    return images


@torch.no_grad()
def features_of(extractor: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 500,
                device: str | torch.device = "cpu") -> np.ndarray:
    """extractor(images) in batches, as a float64 array [B, dim]."""
    images = _check_images(images)
    check_int(batch, "batch")
    out = [extractor(images[k:k + batch].to(device)).double().cpu() for k in range(0, images.shape[0], batch)]
    return torch.cat(out).numpy()


# ============================================================================================
# Distance to the teacher


def rmse_to_reference(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Per-pixel RMS distance between ``images`` and ``reference`` paired by index (the same
    noise): sqrt of the mean squared difference over every pixel of every pair, in [-1, 1] units
    (the demo's "RMSE to Heun")."""
    images, reference = _check_images(images), _check_images(reference, "reference")
    if images.shape != reference.shape:
        raise ValueError(f"reference: expected one image per image, shape {tuple(images.shape)}, got "
                         f"{tuple(reference.shape)}")
    return float((images.double() - reference.double()).square().mean().sqrt())


class TeacherDistance:
    """The distance of samples to the teacher's own multi-step samples from the same noise and
    labels: ``fd_teacher`` (Frechet distance between the two sets' features; 0 for the teacher),
    ``rmse_teacher`` (``rmse_to_reference``) and, with an ``lpips`` callable (e.g.
    pid_fast.eval.lpips.LPIPSNorm), ``lpips_teacher`` (mean per-sample LPIPS).

    teacher_images: [B, C, H, W] in [-1, 1]; the images scored must come from the same seeds in
    the same order. extractor: the feature network (DigitsFeatures, InceptionFeatures)."""

    def __init__(self, teacher_images: torch.Tensor, extractor: Callable[[torch.Tensor], torch.Tensor], *,
                 batch: int = 500, device: str | torch.device = "cpu",
                 lpips: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None):
        self.images = _check_images(teacher_images, "teacher_images").float().clamp(-1, 1)
        self.extractor, self.batch, self.device, self.lpips = extractor, batch, device, lpips
        self.stats = feature_statistics(features_of(extractor, self.images, batch=batch, device=device))

    def from_features(self, feats: Any, images: torch.Tensor) -> dict[str, float]:
        """The distances of ``images`` whose features ``feats`` are already computed."""
        if images.shape[0] != self.images.shape[0]:
            raise ValueError(f"images: {images.shape[0]} samples, but the teacher's samples are "
                             f"{self.images.shape[0]}; score the same seeds")
        out = {"fd_teacher": fd_from_features(feats, self.stats),
               "rmse_teacher": rmse_to_reference(images.float().clamp(-1, 1), self.images)}
        if self.lpips is not None:
            with torch.no_grad():
                values = [self.lpips(images[k:k + self.batch].to(self.device).float().clamp(-1, 1),
                                     self.images[k:k + self.batch].to(self.device)).double().cpu()
                          for k in range(0, images.shape[0], self.batch)]
            out["lpips_teacher"] = float(torch.cat(values).mean())
        return out

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        images = _check_images(images)
        return self.from_features(features_of(self.extractor, images, batch=self.batch, device=self.device), images)


# ============================================================================================
# Digits features (offline)

class DigitsFeatures:
    """Features of the bundled digits classifier (or of ``path``): [B, 1, 16, 16] in [-1, 1]
    -> [B, 64]. Images are clamped to [-1, 1] first (as one-step samples are)."""

    def __init__(self, path: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu"):
        from pid_fast.eval.digits import load_classifier

        self.device = torch.device(device)
        self.model = load_classifier(path, device=self.device)
        self.resolution = int(self.model.config["resolution"])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images.to(self.device, torch.float32).clamp(-1, 1))

    def features(self, images: torch.Tensor, batch: int = 500) -> np.ndarray:
        return features_of(self, images, batch=batch, device=self.device)


def digits_reference_features(extractor: Optional[DigitsFeatures] = None) -> np.ndarray:
    """Features of all 1797 digits images (the reference set of the digits FD), computed once
    per extractor."""
    from pid_fast.data.digits import load_digits

    extractor = extractor or DigitsFeatures()
    if getattr(extractor, "_reference", None) is None:
        images, _ = load_digits(extractor.resolution)
        extractor._reference = extractor.features(images)
    return extractor._reference


def digits_fd(images: torch.Tensor, extractor: Optional[DigitsFeatures] = None, *,
              with_kid: bool = False) -> float | tuple[float, float]:
    """Frechet distance (and optionally KID) between ``images`` and the digits data, in the
    feature space of the digits classifier. Use at least ~1000 images: the estimate is biased
    upwards for small samples (compare numbers at equal sample counts only)."""
    extractor = extractor or DigitsFeatures()
    feats = extractor.features(_check_images(images))
    ref = digits_reference_features(extractor)
    fd = fd_from_features(feats, ref)
    return (fd, kernel_distance(feats, ref)) if with_kid else fd


# ============================================================================================
# Inception (clean-fid's legacy_tensorflow mode), from a local file

def _inception_file(path: str | os.PathLike) -> str:
    if path is None:
        raise FileNotFoundError(f"Inception weights: no path given. Download clean-fid's {INCEPTION_FILENAME} "
                                f"(https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                                f"{INCEPTION_FILENAME}) on a machine with internet, copy it here and pass its path.")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, INCEPTION_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights: no such file: {path!r}. pid_fast never downloads; fetch "
                                f"clean-fid's {INCEPTION_FILENAME} (https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-"
                                f"pytorch/pretrained/metrics/{INCEPTION_FILENAME}) and pass its path.")
    return path


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """clean-fid's ``InceptionV3W`` in ``legacy_tensorflow`` mode (``resize_inside=True``) with the
    torchscript weights at ``path`` (the file, or a folder holding ``inception-2015-12-05.pt``),
    constructed with ``download=False``. Input: float [B, 3, H, W] in [0, 255]; output [B, 2048]."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = _inception_file(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    if os.path.basename(path) != INCEPTION_FILENAME:
        # InceptionV3W takes a folder and the fixed file name: link the user's file under it.
        tmp = tempfile.mkdtemp(prefix="pid_fast_inception_")
        os.symlink(os.path.abspath(path), os.path.join(tmp, INCEPTION_FILENAME))
        folder = tmp
    try:
        model = InceptionV3W(folder, download=False, resize_inside=True)
    except Exception as exc:  # torch.jit.load's errors vary with the way the file is broken
        raise ValueError(f"Inception weights: {path!r} is not clean-fid's torchscript Inception "
                         f"({INCEPTION_FILENAME}): {exc}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(device).eval()


class InceptionFeatures:
    """[B, C, H, W] in [-1, 1] -> [B, 2048] pool3 features, the reference code's protocol:
    the unquantised float images mapped to [0, 255] (no rounding), grey images repeated to 3
    channels, and the 299x299 resize done inside the network (legacy_tensorflow)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = load_inception(path, device=self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32).clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ValueError(f"images: Inception needs 1 or 3 channels, got {x.shape[1]}")
        return self.model((x + 1) * 127.5).float()

    def features(self, images: torch.Tensor, batch: int = 250) -> np.ndarray:
        return features_of(self, images, batch=batch, device=self.device)


# ============================================================================================
# Reference statistics and image files

def _open_npz(path: str, what: str):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{what}: {path!r} is not a readable .npz ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{what}: {path!r} is a single array, not an .npz archive")
    return data


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with arrays 'mu' and 'sigma' (the format of EDM's and
    clean-fid's reference statistics, and of ``save_reference_stats``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics: no such file: {path!r}")
    data = _open_npz(path, "reference statistics")
    with data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"reference statistics: {path!r} must hold arrays 'mu' and 'sigma', "
                             f"has {sorted(data.files)}")
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics: {path!r} has mu {mu.shape} and sigma {sigma.shape}; "
                         f"expected [dim] and [dim, dim]")
    return mu, sigma


def save_reference_stats(path: str | os.PathLike, feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Write the (mu, sigma) of ``feats`` to an .npz (keys 'mu', 'sigma') and return them."""
    mu, sigma = feature_statistics(feats)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return mu, sigma


_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff")


def load_images(source: str | os.PathLike, num: Optional[int] = None) -> torch.Tensor:
    """Images as float32 [B, C, H, W] in [-1, 1] from
    - a folder of image files (sorted, searched recursively), decoded with PIL;
    - an .npz with 'x' (float NCHW in [-1, 1], unquantised: what ``pid-fast sample`` writes),
      else 'images' or 'arr_0' (uint8 NHWC, EDM/ADM style).
    ``num`` keeps the first num images (all when None)."""
    source = os.fspath(source)
    check_int(num, "num", allow_none=True)
    if os.path.isdir(source):
        from PIL import Image

        files = sorted(f for ext in _IMAGE_EXTENSIONS for pattern in (ext, ext.upper())
                       for f in glob.glob(os.path.join(source, "**", f"*.{pattern}"), recursive=True))
        if not files:
            raise ValueError(f"source: no image files ({', '.join(_IMAGE_EXTENSIONS)}) in folder {source!r}")
        files = files[:num] if num is not None else files
        arrays = [np.asarray(Image.open(f)) for f in files]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"source: images in {source!r} have different shapes {sorted(shapes)[:4]}")
        x = np.stack(arrays)
        x = x[..., None] if x.ndim == 3 else x
        return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    if source.endswith(".npz"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"source: no such file: {source!r}")
        with _open_npz(source, "source") as data:
            if "x" in data:
                x = torch.from_numpy(np.asarray(data["x"], np.float32))
                if x.ndim != 4:
                    raise ValueError(f"source: 'x' in {source!r} must be [B, C, H, W], got {tuple(x.shape)}")
            else:
                key = "images" if "images" in data else "arr_0" if "arr_0" in data else None
                if key is None:
                    raise ValueError(f"source: {source!r} must hold 'x' (float NCHW in [-1, 1]) or "
                                     f"'images'/'arr_0' (uint8 NHWC), has {sorted(data.files)}")
                a = np.asarray(data[key])
                if a.ndim != 4 or a.dtype != np.uint8:
                    raise ValueError(f"source: {key!r} in {source!r} must be uint8 [B, H, W, C], got "
                                     f"{a.dtype} {a.shape}")
                x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x[:num] if num is not None else x
    if not os.path.exists(source):
        raise FileNotFoundError(f"source: no such file or folder: {source!r}")
    raise ValueError(f"source: {source!r} is neither a folder of images nor an .npz")
