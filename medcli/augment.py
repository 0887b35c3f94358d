"""Preprocessing and batched on-device training augmentation.

Everything works on whole uint8 (B, C, H, W) batches on the training device: one
`affine_grid` + `grid_sample` per batch for every geometric transform (flips, 90-degree
turns, small rotations, random-resized-crop) at the model's input size, images larger than
that first resized exactly as in evaluation (`preprocess`), a few vectorised ops for
brightness/contrast, and MixUp on the finished batch. No per-image Python, no PIL, no
DataLoader workers (the seeds spent hours in per-image PIL resizes).

Every random draw comes from a `torch.Generator`, so a seeded run is reproducible and a
resumed run continues the same random stream. That generator must be a CPU generator,
whatever device trains: the per-sample numbers (angles, flips, crops, jitter factors, the
MixUp permutation and seed) are drawn on the CPU and only those small tensors move to the
batch's device. The stream is then the same on every device, and a run saved on one device
type resumes on another (a CUDA generator's state cannot be loaded into a CPU one, nor the
reverse). Passing another generator is a ValueError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any, NamedTuple

from medcli.errors import UsageError

__all__ = [
    "Augment", "Axes", "Draws", "MODALITIES", "ORIENTED", "apply", "draw", "draw_epoch", "draw_mixup", "flips_help",
    "for_dataset", "make_prep", "preprocess", "source", "take", "test_views",
]

# Per-channel statistics used to normalise inputs from scratch: 0.5/0.5 maps [0, 1] to
# [-1, 1], which suits training from scratch on any MedMNIST modality. A pretrained model
# brings its own statistics (`models.pretrained_stats`).
SCRATCH_STATS = (0.5, 0.5)


def make_prep(input_size: int, channels: int, stats: tuple | None = None) -> dict:
    """The manifest's `preprocess` section: input size, per-channel mean/std, interpolation.

    `stats` = (mean, std) per RGB channel of a pretrained model, None from scratch; a model
    that takes another channel count gets their averages on every channel.
    """
    if stats is None:
        mean, std = [SCRATCH_STATS[0]] * channels, [SCRATCH_STATS[1]] * channels
    elif len(stats[0]) == channels:
        mean, std = [float(v) for v in stats[0]], [float(v) for v in stats[1]]
    else:
        mean, std = [sum(stats[0]) / len(stats[0])] * channels, [sum(stats[1]) / len(stats[1])] * channels
    return {"input_size": int(input_size), "mean": mean, "std": std, "interpolation": "bilinear"}


def _normalise(x, prep: dict):
    """uint8 or [0, 255] float -> (x / 255 - mean) / std in one fused op."""
    import torch

    shift, scale = _normalisation(tuple(prep["mean"]), tuple(prep["std"]), x.device)
    return torch.addcmul(shift, x.float(), scale)


@lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device) -> tuple:
    """(-mean / std, 1 / (255 std)) as (1, C, 1, 1) tensors on `device`, built once per run and
    device: a tensor made from Python numbers on a GPU is a copy the host waits for, and every
    batch (training, validation, BatchNorm re-estimation) is normalised."""
    import torch

    std_t = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    return -mean_t / std_t, 1.0 / (255.0 * std_t)


def preprocess(x, prep: dict):
    """uint8 (B, C, H, W) -> float32 (B, C, S, S) on x's device: scale, resize, normalise.

    Normalising before resizing is exact for bilinear resampling (its weights sum to one) and
    touches fewer pixels when upsampling. Downscaling uses antialiasing.
    """
    return _resize(_normalise(x, prep), int(prep["input_size"]))


def _resize(x, size: int):
    """float (B, C, H, W) -> (B, C, size, size), bilinear, antialiased when downscaling.

    The one resize both evaluation (`preprocess`) and training (`apply`) use, so the
    model sees the same pixels in both.
    """
    import torch.nn.functional as F

    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


@dataclass(frozen=True)
class Augment:
    """Training augmentation settings (saved in the manifest config).

    hflip/vflip: random flips with p=0.5; rot90: random multiples of 90 degrees (cell and
    tissue images have no canonical orientation); degrees: extra uniform rotation in
    [-degrees, degrees]; crop_scale: (min, max) area fraction of a random-resized-crop
    (None: no crop); brightness/contrast: multiplicative jitter in [1 - v, 1 + v].
    """

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    degrees: float = 0.0
    crop_scale: tuple[float, float] | None = None
    brightness: float = 0.1
    contrast: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Augment":
        crop = data.get("crop_scale")
        return cls(**{**data, "crop_scale": tuple(crop) if crop else None})

    @property
    def geometric(self) -> bool:
        return self.hflip or self.vflip or self.rot90 or self.degrees > 0 or self.crop_scale is not None


def test_views(aug: Augment) -> dict:
    """Deterministic test-time views of a uint8 NCHW batch that the training augmentation
    `aug` produced, by name: the identity, each trained flip, and both flips together (a
    180-degree turn) when training had both flips or 90-degree turns. Each view is a
    function batch -> batch (evaluate and predict average the probabilities over them)."""
    dims = {"identity": ()}
    if aug.hflip:
        dims["hflip"] = (3,)
    if aug.vflip:
        dims["vflip"] = (2,)
    if (aug.hflip and aug.vflip) or aug.rot90:
        dims["hvflip"] = (2, 3)
    return {name: _flip(flipped) for name, flipped in dims.items()}


def _flip(dims: tuple[int, ...]):
    def view(batch):
        return batch.flip(dims) if dims else batch

    return view


class Axes(NamedTuple):
    """Which geometric transforms keep a dataset's images (and labels) true: a horizontal flip
    (left-right mirror), a vertical flip, 90-degree turns, and the default small rotation."""

    hflip: bool
    vflip: bool
    rot90: bool
    degrees: float
    why: str


_FREE = (True, True, True, 0.0)
# The default augmentation of each MedMNIST 2D dataset (modality from medmnist.INFO), per axis,
# with the reason. --flips / --no-flips turn all three flips on or off; --rotate replaces degrees.
MODALITIES = {
    "pathmnist": Axes(*_FREE, "colon pathology patches: tissue has no up or left"),
    "dermamnist": Axes(*_FREE, "dermatoscope images: a skin lesion has no canonical orientation"),
    "bloodmnist": Axes(*_FREE, "blood-smear cells: no orientation"),
    "tissuemnist": Axes(*_FREE, "kidney cortex microscopy: no orientation"),
    "retinamnist": Axes(*_FREE, "fundus photographs: left and right eyes mirror each other; grades have no up"),
    "octmnist": Axes(True, False, False, 0.0, "retinal OCT B-scans: the vitreous is above the retina's layers; "
                                               "left-right is the nasal/temporal mirror"),
    "breastmnist": Axes(True, False, False, 10.0, "breast ultrasound: the skin (probe) is at the top; left-right "
                                                   "mirrors the same anatomy; the probe tilts a little"),
    "pneumoniamnist": Axes(False, False, False, 10.0, "chest X-ray: the heart is on the left and the apices up; "
                                                       "small rotations from the patient's position"),
    "chestmnist": Axes(False, False, False, 10.0, "chest X-ray: the heart is on the left and the apices up; "
                                                   "small rotations from the patient's position"),
    "organamnist": Axes(False, False, False, 0.0, "abdominal CT, axial: left and right organs are different classes"),
    "organcmnist": Axes(False, False, False, 0.0, "abdominal CT, coronal: left and right organs are different "
                                                   "classes; the body has an up"),
    "organsmnist": Axes(False, False, False, 0.0, "abdominal CT, sagittal: front and back, head and feet are fixed"),
}
# Datasets with at least one axis that may not be flipped (kept for older callers).
ORIENTED = frozenset(flag for flag, axes in MODALITIES.items() if not (axes.hflip and axes.vflip and axes.rot90))
MAX_DEGREES = 180.0


def _axes(flag: str) -> Axes:
    """The table's row (a dataset not in it: every flip and turn, as before the table)."""
    return MODALITIES.get(flag, Axes(*_FREE, "not in the table: every flip and turn"))


def flips_help() -> str:
    """The table in words, for `medcli train --help`."""
    groups: dict[str, list[str]] = {}
    for flag, axes in MODALITIES.items():
        kinds = [name for name, on in (("horizontal", axes.hflip), ("vertical", axes.vflip), ("90-degree turns",
                                                                                              axes.rot90)) if on]
        label = "all flips and turns" if len(kinds) == 3 else f"{kinds[0]} flip only" if kinds else "none"
        groups.setdefault(label, []).append(flag.removesuffix("mnist"))
    return "; ".join(f"{label}: {', '.join(flags)}" for label, flags in groups.items())


def source(flag: str, **given: Any) -> str:
    """Where a dataset's augmentation comes from, for the manifest: the table's reason and the
    options given (each replaces the table's value)."""
    options = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    return f"{flag}: {_axes(flag).why}" + (f"; given: {', '.join(options)}" if options else "")


def for_dataset(flag: str, *, flips: bool | None = None, rotate: float | None = None,
                crop_scale: float | None = None, jitter: float | None = None) -> Augment:
    """The training augmentation for dataset `flag`; each option left at None keeps the default.

    flips: random horizontal/vertical flips and 90-degree turns (default: each axis as the
    dataset's MODALITIES row says); rotate: extra uniform rotation in [-rotate, rotate] degrees
    (default: the row's); crop_scale: random-resized-crop keeping between that fraction and all
    of the image area; jitter: brightness and contrast factors in [1 - jitter, 1 + jitter].
    """
    axes = _axes(flag)
    if flips is None:
        aug = Augment(hflip=axes.hflip, vflip=axes.vflip, rot90=axes.rot90, degrees=axes.degrees)
    else:
        aug = Augment(hflip=bool(flips), vflip=bool(flips), rot90=bool(flips), degrees=axes.degrees)
    if rotate is not None:
        if not 0 <= rotate <= MAX_DEGREES:
            raise UsageError(f"--rotate must be between 0 and {MAX_DEGREES:g} degrees (got {rotate:g})")
        aug = replace(aug, degrees=float(rotate))
    if crop_scale is not None:
        if not 0 < crop_scale <= 1:
            raise UsageError(f"--crop-scale must be in (0, 1], the smallest kept share of the image area (got {crop_scale:g})")
        aug = replace(aug, crop_scale=None if crop_scale == 1 else (float(crop_scale), 1.0))
    if jitter is not None:
        if not 0 <= jitter < 1:
            raise UsageError(f"--jitter must be in [0, 1) (got {jitter:g})")
        aug = replace(aug, brightness=float(jitter), contrast=float(jitter))
    return aug


def _cpu_generator(generator):
    """`generator` itself, refused unless it is a CPU `torch.Generator` (module docstring)."""
    import torch

    device = getattr(generator, "device", None)
    if device != torch.device("cpu"):
        raise ValueError(f"augmentation needs a CPU torch.Generator whatever device trains, so that its "
                         f"stream and saved state are the same on every device (got a {type(generator).__name__} "
                         f"on {device})")
    return generator


def _uniform(n: int, low: float, high: float, generator):
    """n uniform draws in [low, high), made on the (CPU) generator's device."""
    import torch

    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def _affine(n: int, aug: Augment, generator):
    """Per-sample 2x3 affine matrices (output -> input coordinates) for `affine_grid`.

    Built where the draws are made, on the (CPU) generator's device; the caller moves the
    finished (n, 2, 3) tensor to the batch's device.
    """
    import math

    import torch

    device = generator.device
    angle = torch.zeros(n, device=device)
    if aug.rot90:
        angle += torch.randint(0, 4, (n,), generator=generator, device=device) * (math.pi / 2)
    if aug.degrees > 0:
        angle += _uniform(n, -aug.degrees, aug.degrees, generator) * (math.pi / 180)
    sx = torch.ones(n, device=device)
    sy = torch.ones(n, device=device)
    if aug.hflip:
        sx = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -sx, sx)
    if aug.vflip:
        sy = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -sy, sy)
    tx = torch.zeros(n, device=device)
    ty = torch.zeros(n, device=device)
    if aug.crop_scale is not None:
        # A square crop covering `area` of the image, placed uniformly inside it.
        side = _uniform(n, *aug.crop_scale, generator).sqrt()
        sx, sy = sx * side, sy * side
        tx = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - side)
        ty = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - side)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([cos * sx, -sin * sy, tx], dim=1),
        torch.stack([sin * sx, cos * sy, ty], dim=1),
    ], dim=1)
    return theta


def draw(n: int, aug: Augment, generator) -> dict:
    """The random parameters of `n` augmented samples, drawn on the CPU `generator` (module
    docstring): per-sample affine matrices, contrast and brightness factors. Drawing for a
    whole global batch and applying a slice of it (`take`) is how every process of a
    distributed run augments its shard exactly as one process would."""
    _cpu_generator(generator)
    params = {}
    if aug.geometric:
        params["theta"] = _affine(n, aug, generator)
    if aug.contrast > 0:
        params["contrast"] = _uniform(n, 1 - aug.contrast, 1 + aug.contrast, generator)
    if aug.brightness > 0:
        params["brightness"] = _uniform(n, 1 - aug.brightness, 1 + aug.brightness, generator)
    return params


def take(params: dict, index) -> dict:
    """The parameters of some samples of a drawn batch (`index`: a slice or CPU index tensor)."""
    return {key: value[index] for key, value in params.items()}


def apply(x, prep: dict, aug: Augment, params: dict):
    """uint8 (B, C, H, W) batch -> augmented, resized, normalised float32 (B, C, S, S), with
    `params` drawn for these B samples.

    The geometric transforms run as one `grid_sample` at the model's input size (reflection
    padding, so rotated corners hold image content rather than black). Images larger than
    the input are first resized exactly as `preprocess` does (antialiased): a grid_sample
    straight to a smaller size would alias, and the model would train on other pixels than
    it is evaluated on. Smaller or equal images go through the grid_sample alone, which
    resamples once and agrees with `preprocess`'s bilinear upsampling. Photometric jitter is
    applied to per-image means so it works for any channel count.
    """
    import torch
    import torch.nn.functional as F

    size = int(prep["input_size"])
    n = x.shape[0]
    device = x.device
    out = x.float()
    if not aug.geometric or size < x.shape[-1]:
        out = _resize(out, size)
    if aug.geometric:
        grid = F.affine_grid(params["theta"].to(device, non_blocking=True), [n, x.shape[1], size, size],
                             align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if aug.contrast > 0:
        factor = params["contrast"].to(device, non_blocking=True).view(-1, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = torch.lerp(mean, out, factor)
    if aug.brightness > 0:
        out = out * params["brightness"].to(device, non_blocking=True).view(-1, 1, 1, 1)
    if aug.contrast > 0 or aug.brightness > 0:
        out = out.clamp_(0, 255)
    return _normalise(out, prep)


def draw_mixup(n: int, alpha: float, generator) -> tuple:
    """(lam, perm) of MixUp for a batch of n: one weight lam ~ Beta(alpha, alpha) per batch (as
    in the MixUp paper and timm) and the partner of each sample (perm, on the CPU). torch's
    Beta sampler takes no generator, so lam is drawn by numpy from a seed taken from
    `generator`: the stream stays reproducible and resumable."""
    _cpu_generator(generator)
    seed, perm = _mixup_draws(n, generator)
    return _beta(int(seed), alpha), perm


def _mixup_draws(n: int, generator) -> tuple:
    """MixUp's draws from `generator`: the seed of lam's Beta draw (a 1-element tensor) and perm."""
    import torch

    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
    return seed, torch.randperm(n, generator=generator, device=generator.device)


def _beta(seed: int, alpha: float) -> float:
    import numpy as np

    return float(np.random.default_rng(seed).beta(alpha, alpha))


@dataclass
class Draws:
    """The random numbers of a training epoch, drawn up front (`draw_epoch`): each step's
    augmentation parameters (`params[key][step]`, as `draw` makes them) and, with MixUp, its
    weight (`lams[step]`) and partners (`perms[step]`)."""

    params: dict
    lams: list
    perms: Any = None  # (steps, batch) int64, None without MixUp

    def map(self, move) -> "Draws":
        """The same draws with every tensor passed through `move` (e.g. to the device)."""
        return Draws({key: move(value) for key, value in self.params.items()}, self.lams,
                     None if self.perms is None else move(self.perms))


def draw_epoch(steps: int, batch: int, aug: Augment, alpha: float, generator) -> Draws:
    """The numbers `steps` calls of `draw(batch, ...)` make, each followed (alpha > 0) by
    `draw_mixup(batch, alpha, ...)`: the same calls on `generator` in the same order, stacked
    per step, so an epoch's parameters reach the device in one copy each and the MixUp seeds
    are read in one go."""
    import torch

    _cpu_generator(generator)
    params, seeds, perms = [], [], []
    for _ in range(steps):
        params.append(draw(batch, aug, generator))
        if alpha > 0:
            seed, perm = _mixup_draws(batch, generator)
            seeds.append(seed)
            perms.append(perm)
    stacked = {key: torch.stack([step[key] for step in params]) for key in (params[0] if params else {})}
    lams = [_beta(seed, alpha) for seed in torch.cat(seeds).tolist()] if seeds else []
    return Draws(stacked, lams, torch.stack(perms) if perms else None)
