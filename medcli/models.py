"""One model factory for every architecture medcli trains (`create`, `rebuild`), one record per family.

Like timm's `create_model`, `create` builds any model by name, adapted to the dataset (class count,
grayscale or RGB, input size), optionally from ImageNet or a local file, and returns it with a plain
JSON *spec* for the run manifest: `rebuild(spec)` gives the same architecture later (evaluate,
explain) without the network (`medcli.run.Run.load_model` adds a run's checkpoint). Everything medcli
decides per model family (training defaults, --reduced preset, stem policy, default CAM layer, ViT
token reshape, rollout, channels_last, where torchvision weights go) is one `Family` record in FAMILIES,
like a row of medmnist's INFO or timm's pretrained config: `config` and `explain` ask the record, never
the name. torch, torchvision and timm are imported inside functions (the CLI's help reads the records).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from medcli import fileio, hub
from medcli.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "FAMILIES", "Family", "KINDS", "STEMS", "SmallMapConv2d", "Torchvision", "VALID_NAMES",
    "create", "load_state", "make_deterministic", "pretrained_stats", "read_state_dict", "rebuild",
    "record", "resize_kernel", "spec_record",
]

ALIASES = {  # medcli name -> (architecture, library); each has a record in FAMILIES
    "resnet18": ("resnet18", "torchvision"),
    "densenet121": ("densenet121", "torchvision"),
    "vit": ("vit_base_patch16_224", "timm"),
    "vit-small": ("vit_small_patch16_224", "timm"),
    "vit-tiny": ("vit_tiny_patch16_224", "timm"),
}
TIMM_PREFIX = "timm:"
VALID_NAMES = f"{', '.join(ALIASES)} or {TIMM_PREFIX}<name>"
DEFAULT_MODEL = "resnet18"
# Stem policy of the torchvision CNNs: the stem that brings the image to 28-56 px at ResNet-18's layer1
# with the least compute. Measured training cost on 2 CPU cores (scripts/bench_stems.py, relative to 28 px
# with the small stem): 28 px small 1.0x (layer1 at 28 px); 64 px small 4.5x (64 px), small+pool 1.2x
# (32 px); 128 px imagenet 1.2x (32 px), small+pool 5.7x; 224 px imagenet 3.7x (56 px). So: below 48 px
# the 3x3 stride-1 stem without max-pool ("small"), below 128 px the same conv followed by the max-pool
# ("small+pool"), from 128 px ImageNet's 7x7 stride-2 conv and max-pool ("imagenet"). DenseNet-121's
# conv0 + pool0 follow it too. The stem is recorded in the model spec: a run rebuilds with its own.
SMALL_STEM_BELOW = 128  # below: the 3x3 stride-1 conv
POOLED_STEM_FROM = 48  # from here (and with keep_maxpool) the small stem keeps the max-pool
STEMS = ("small", "small+pool", "imagenet")
SMALL_MAP_POSITIONS = 4  # SmallMapConv2d: output maps of at most this many positions (2x2) use unfold + matmul
# timm modules of plain ViTs (class token, `blocks[i].norm1`, `attn.qkv`): what the "vit" record relies on.
_VIT_MODULES = {"vision_transformer", "deit"}
WEIGHTS_FIX = "pass a state dict saved from this architecture"


@dataclass(frozen=True)
class Torchvision:
    """Where a torchvision CNN keeps the parts medcli adapts (timm's pretrained config says it for timm's)."""

    weights: str  # the torchvision.models enum of its ImageNet weights
    first_conv: str  # the small stem's 3x3 conv replaces it; ImageNet's kernels are resized into it
    pool: str  # the stem's max-pool: an Identity in the "small" stem
    classifier: str  # dropped from weights whose class count differs
    fix_keys: Callable[[dict], dict] | None = None  # older weight files' key names -> today's
    conv_init: str = "fan_out"  # the Kaiming mode of torchvision's own conv init (a replaced first conv gets it)


KINDS = {"cnn": "CNNs", "vit": "ViTs"}  # the kinds of model a family is, as help texts name them


@dataclass(frozen=True)
class Family:
    """What medcli decides per model family (the records are FAMILIES; `record(name)`)."""

    label: str  # the models it covers, for help texts
    kind: str  # a key of KINDS: the spec's "family", named in the config's lr and batch sources
    build: Callable[..., Any]  # spec (timm: + timm's loading options) -> the model, randomly initialised
    defaults: Mapping[str, Any]  # training defaults: `config.resolve_config` starts from them
    reduced: Mapping[str, Any]  # --reduced: the config values it sets...
    reduced_overrides: Mapping[str, Any]  # ...and the architecture options
    cam_stages: Callable[[Any], list[str]]  # model -> candidates for the default CAM layer, shallow to deep
    reduced_alias: tuple[str, Mapping[str, Any]] | None = None  # --reduced: built-in names become this variant
    stem: Callable[[int, bool], str] | None = None  # (input size, keep_maxpool) -> stem, recorded in the spec
    token_grid: Callable[[Any, Mapping], tuple[int, tuple[int, int]]] | None = None  # ViT tokens: (prefix, grid)
    rollout: bool = False  # attention rollout explains it
    channels_last: bool = True  # train in NHWC memory format
    torchvision: Torchvision | None = None  # None: a timm model


# -- names ----------------------------------------------------------------------------------
def resolve(name: str) -> tuple[str, str]:
    """(architecture, library) for a medcli model name; library is "torchvision" or "timm"."""
    if name in ALIASES:
        return ALIASES[name]
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name[len(TIMM_PREFIX):]
        if not timm.is_model(arch):
            raise UsageError(f"timm has no model '{arch}'; find names with python -c \"import timm; "
                             f"print(timm.list_models('*{arch[:8]}*'))\"")
        return arch, "timm"
    raise UsageError(f"unknown model '{name}'; choose {VALID_NAMES} (any timm model)")


def record(name: str) -> Family:
    """The family record of model `name`: a torchvision alias's own, else timm's ViT or CNN one."""
    arch, library = resolve(name)
    if library == "torchvision":
        return FAMILIES[arch]
    import timm

    vit = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1] in _VIT_MODULES
    return FAMILIES["vit" if vit else "timm"]


def spec_record(spec: Mapping[str, Any]) -> Family:
    """The family record of a model built before (its spec), without importing timm: a
    torchvision alias's own record, else the timm record of the kind the spec recorded."""
    arch, library = ALIASES.get(spec.get("name"), (None, "timm"))
    return FAMILIES[arch] if library == "torchvision" else FAMILIES["vit" if spec.get("family") == "vit" else "timm"]


# -- building -------------------------------------------------------------------------------
def create(name: str, num_classes: int, in_chans: int, input_size: int, pretrained: bool = False,
           weights: str | os.PathLike | None = None, **overrides: Any) -> tuple[nn.Module, dict]:
    """Build model `name` for the dataset and return (model, spec).

    `weights` (a local file) wins over `pretrained` (ImageNet weights, downloaded or cached);
    when those cannot be fetched the model trains from scratch after one warning, and the spec
    says `pretrained: false`. `overrides` go to the architecture (timm kwargs such as
    `patch_size=4`; `keep_maxpool=True` for a torchvision CNN's small stem).
    """
    rec = record(name)
    spec = {"name": name, "arch": resolve(name)[0], "family": rec.kind,
            "num_classes": _positive(num_classes, "number of classes"),
            "in_chans": _positive(in_chans, "number of input channels"),
            "input_size": _positive(input_size, "input size"),
            "pretrained": False, "weights": None, "overrides": dict(overrides)}
    if rec.stem:
        spec["stem"] = rec.stem(input_size, overrides.get("keep_maxpool", False))
    state = _read_weights_file(Path(weights)) if weights is not None else None  # fail before building
    other_timm = rec is FAMILIES["timm"]  # the ViT record builds for the input size itself
    model = _sized(spec) if other_timm and "img_size" not in overrides else rebuild(spec)
    if name.startswith(TIMM_PREFIX):
        _probe(model, spec)
    if state is not None:
        load = _load_torchvision_state if rec.torchvision else _load_timm_state
        model = load(model, spec, state, str(weights), WEIGHTS_FIX)
        spec.update(pretrained=True, weights=str(Path(weights).resolve()), weights_sha256=fileio.sha256_file(weights))
    elif pretrained:
        loaded = _load_imagenet(model, spec)
        if loaded is not None:
            model = loaded
            spec["pretrained"] = True
    spec["params"] = sum(p.numel() for p in model.parameters())
    return model, spec


def _sized(spec: dict) -> nn.Module:
    """A timm model built for the spec's input size where it takes one (MaxViT, Swin and other
    models built for a size; the spec then records `img_size`, so `rebuild` builds it the same),
    else as it comes (CNNs), with the same initialisation as without the attempt."""
    import torch

    spec["overrides"]["img_size"] = spec["input_size"]
    state = torch.get_rng_state()
    try:
        return rebuild(spec)
    except UsageError as exc:
        if not (isinstance(exc.__cause__, TypeError) and "img_size" in str(exc.__cause__)):
            raise
    del spec["overrides"]["img_size"]
    torch.set_rng_state(state)
    return rebuild(spec)


def _probe(model: nn.Module, spec: dict) -> None:
    """One forward pass of a blank image at the input size (eval mode: no random numbers drawn),
    so a timm model that cannot take that size is a UsageError here, before any run exists."""
    import torch

    size, was_training = spec["input_size"], model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, spec["in_chans"], size, size))
    except Exception as exc:  # any architecture's complaint about the shape
        raise UsageError(f"{spec['name']} does not take {size}-px inputs ({hub.one_line(exc)[:160]}); choose another "
                         "--input-size or model") from None
    finally:
        model.train(was_training)


def cnn_stem(input_size: int, keep_maxpool: bool = False) -> str:
    """The torchvision CNNs' stem for an input size (the policy above STEMS)."""
    if input_size >= SMALL_STEM_BELOW:
        return "imagenet"
    return "small+pool" if keep_maxpool or input_size >= POOLED_STEM_FROM else "small"


def rebuild(spec: Mapping[str, Any]) -> nn.Module:
    """The architecture a spec describes (with its recorded stem), randomly initialised; no network."""
    return record(spec["name"]).build(spec)


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be a positive integer, got {value!r}")
    return value


def _bad_option(name: str, exc: TypeError) -> UsageError:
    return UsageError(f"model {name} does not accept that option ({exc}); drop it or pick another model")


def _torchvision_cnn(spec: Mapping[str, Any]) -> nn.Module:
    """The spec's torchvision CNN with the stem the spec records (default: its record's policy).
    ImageNet's 7x7 stride-2 conv plus max-pool shrinks a 28-px image to 7x7 before the first block
    and costs accuracy; the small stem keeps the resolution (`keep_maxpool=True` halves it once,
    trading a little accuracy for about 2.5x less compute at 28 px)."""
    import torchvision
    from torch import nn

    rec, overrides = record(spec["name"]), dict(spec.get("overrides", {}))
    keep_maxpool = overrides.pop("keep_maxpool", False)
    try:
        model = getattr(torchvision.models, resolve(spec["name"])[0])(num_classes=spec["num_classes"], **overrides)
    except TypeError as exc:
        raise _bad_option(spec["name"], exc) from exc
    stem = spec.get("stem") or rec.stem(spec["input_size"], keep_maxpool)
    if stem == "small" and keep_maxpool:  # recorded before "small+pool" existed (--reduced runs): pooled
        stem = "small+pool"
    conv, in_chans = model.get_submodule(rec.torchvision.first_conv), spec["in_chans"]
    if stem != "imagenet":
        conv = nn.Conv2d(in_chans, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        if stem == "small":
            model.set_submodule(rec.torchvision.pool, nn.Identity())
    elif in_chans != 3:
        conv = nn.Conv2d(in_chans, conv.out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    model.set_submodule(rec.torchvision.first_conv, conv)
    nn.init.kaiming_normal_(conv.weight, mode=rec.torchvision.conv_init, nonlinearity="relu")  # as torchvision's
    return model


def _densenet121(spec: Mapping[str, Any]) -> nn.Module:
    """DenseNet-121 with its stem as a Sequential of the same modules (same state-dict keys) whose global
    pool is a module `make_deterministic` can swap (DenseNet.forward calls F.adaptive_avg_pool2d: no
    deterministic CUDA backward). Its final ReLU is not in place, so a CAM on features.norm5 sees its
    own output. No SmallMapConv2d: a 28-px CPU training step took 3-7% longer with it."""
    from collections import OrderedDict

    from torch import nn

    net = _torchvision_cnn(spec)
    return nn.Sequential(OrderedDict(features=net.features, relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                     flatten=nn.Flatten(1), classifier=net.classifier))


def _densenet_keys(state: Mapping[str, Any]) -> dict:
    """`state` through torchvision's own key fix for DenseNet files from before torchvision 0.4
    ("norm.1" is now "norm1"): its loader, handed the dict as the weights and a recorder as the model."""
    from torchvision.models.densenet import _load_state_dict

    fixed: dict = {}
    _load_state_dict(SimpleNamespace(load_state_dict=fixed.update),
                     SimpleNamespace(get_state_dict=lambda **_: dict(state)), progress=False)
    return fixed


@cache
def _torch_modules() -> SimpleNamespace:
    """medcli's torch modules, defined on first use (importing this module must not import torch)."""
    import torch.nn.functional as F
    from torch import nn

    class SmallMapConv2d(nn.Conv2d):
        """nn.Conv2d with the same parameters and results that computes, on the CPU, an output
        map of at most SMALL_MAP_POSITIONS positions as `unfold` + one matrix product.

        oneDNN's backward pass for a 3x3 convolution on a 2x2 map (ResNet-18's last stage on a 28-px
        image with the max-pool kept) runs 4-7x slower than its forward pass and took half of the
        training step on 2 CPU cores; as a matrix product the whole step ran 28-35% faster. On 4x4
        maps and larger oneDNN is the faster one (measured), and on GPUs cuDNN is: standard path."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu" or x.dim() != 4:
                return super().forward(x)
            n, _, h, w = x.shape
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
            ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            if ho * wo > SMALL_MAP_POSITIONS:
                return super().forward(x)
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (n, c*kh*kw, ho*wo)
            out = cols.transpose(1, 2).reshape(n * ho * wo, -1) @ self.weight.reshape(self.out_channels, -1).t()
            if self.bias is not None:
                out = out + self.bias
            return out.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)  # channels_last memory

    class GlobalAvgPool(nn.Module):
        """Mean over the spatial dimensions, (N, C, H, W) -> (N, C, 1, 1): what
        `nn.AdaptiveAvgPool2d(1)` computes, with a deterministic CUDA backward (the adaptive
        pool's backward has none, so strict mode would stop at the first step)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3), keepdim=True)

    SmallMapConv2d.__qualname__, GlobalAvgPool.__qualname__ = "SmallMapConv2d", "GlobalAvgPool"  # picklable
    return SimpleNamespace(SmallMapConv2d=SmallMapConv2d, GlobalAvgPool=GlobalAvgPool)


def __getattr__(name: str) -> Any:  # models.SmallMapConv2d, models.GlobalAvgPool
    if name in ("SmallMapConv2d", "GlobalAvgPool"):
        return getattr(_torch_modules(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _use_small_map_convs(model: nn.Module) -> nn.Module:
    """Turn every plain Conv2d in `model` into a SmallMapConv2d in place: same parameter
    tensors, so state dicts, initialisation and the random stream are unchanged."""
    from torch import nn

    for conv in model.modules():
        if type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros" \
                and not isinstance(conv.padding, str):
            conv.__class__ = _torch_modules().SmallMapConv2d
    return model


def _timm_model(spec: Mapping[str, Any], fixed_size: bool = False, **load: Any) -> nn.Module:
    """A timm model for the spec; `load` adds timm's pretrained arguments. `fixed_size`: built
    for the spec's input size (ViTs: their positional embeddings follow it)."""
    import timm

    overrides = dict(spec.get("overrides", {}))
    if fixed_size:
        overrides.setdefault("img_size", spec["input_size"])
    try:
        model = timm.create_model(spec["arch"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                                  **overrides, **load)
    except TypeError as exc:
        raise _bad_option(spec["name"], exc) from exc
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch and spec["input_size"] % patch[0]:
        size, step = spec["input_size"], patch[0]
        raise UsageError(f"{spec['name']}: input size {size} is not divisible by its patch size {step}; pass an "
                         f"--input-size divisible by {step} (e.g. {-(-size // step) * step})")
    return model


def _stages(model: nn.Module) -> list[str]:
    """A CNN's stages, shallow to deep: timm's `feature_info`, else the top-level children."""
    info = getattr(model, "feature_info", None) or []
    return [f["module"] for f in info] or [name for name, _ in model.named_children()]


# -- the records ------------------------------------------------------------------------------
# Training defaults (for a batch of 128, training from scratch). CNNs: SGD with Nesterov momentum, a
# one-epoch warm-up and cosine decay. ViTs have no convolutional prior and are unstable early, so
# AdamW, a longer warm-up, stronger weight decay, MixUp; they train at 224 px. Both use label smoothing.
# Weights that really loaded (--pretrained, --weights) divide the default lr (`config.fine_tune_lr`).
CNN_DEFAULTS = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1.0, "epochs": 60,
                "batch_size": 128, "label_smoothing": 0.1, "mixup_alpha": 0.0}
VIT_DEFAULTS = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 5.0, "epochs": 100,
                "batch_size": 128, "label_smoothing": 0.1, "mixup_alpha": 0.2, "input_size": 224}
# --reduced: CPU-friendly presets, 28-px model input. CNN: the stride-1 3x3 stem keeps its max-pool
# (4x fewer FLOPs), and batch 64 gives twice the updates of batch 128 for the same compute (batch 128
# reached 94.9% test accuracy in 4 epochs, underfitting). Measured on 2 CPU cores (ResNet-18): 3 epochs
# 96.76% test in 5.8 min (with SmallMapConv2d; 6.8 min without), 4 epochs 96.93% in 9.0 min, 2 epochs
# 95.64%; 3 is the preset. ViT: every ViT gets 4-px patches (a 16-px patch does not even divide 28 px);
# the built-in names become a 6-block, 128-wide ViT (49 tokens instead of 196 at 224 px): a training
# step costs about 0.6x a reduced ResNet-18 step on CPU, where the 192-wide ViT-Tiny costs 1.2x. 10
# epochs reached 95.26% test in 11.1 min on 2 cores, 8 epochs 94.48-94.88% in 9.2 min (lr 2e-3 or
# batch 64: also 94.48%); 8 is the preset.
# A small training set keeps the preset's number of optimizer steps (min_steps: about what its epochs
# make on BloodMNIST's 11,959 images) by training more epochs: on the 2,000-image embedded sample, 3
# CNN epochs (188 steps) reached 87.1% test, 8 ViT epochs 81.9%.
CNN_REDUCED = {"epochs": 3, "input_size": 28, "warmup_epochs": 0.5, "mixup_alpha": 0.0, "batch_size": 64, "lr": 0.05,
               "min_steps": 550}
VIT_REDUCED = {"epochs": 8, "input_size": 28, "warmup_epochs": 1.0, "mixup_alpha": 0.0, "min_steps": 740}
FAMILIES = {  # torchvision families under their alias; "vit" and "timm" for timm:<name> (see `record`)
    "resnet18": Family("resnet18", "cnn", lambda spec: _use_small_map_convs(_torchvision_cnn(spec)), CNN_DEFAULTS,
                       CNN_REDUCED, {"keep_maxpool": True}, _stages, stem=cnn_stem,
                       torchvision=Torchvision("ResNet18_Weights", "conv1", "maxpool", "fc")),
    # MedMNIST+'s strongest CNN. --reduced keeps the max-pool: a training step (batch 64, 28 px,
    # 3 channels, 8 classes, SGD, 2 shared CPU cores) took 0.46-0.58 s with it, 1.5-1.9x the reduced
    # ResNet-18's 0.28-0.34 s, and 1.9-4.0 s without it (6-13x).
    "densenet121": Family("densenet121", "cnn", _densenet121, CNN_DEFAULTS, CNN_REDUCED, {"keep_maxpool": True},
                          lambda model: [f"features.{name}" for name, _ in model.features.named_children()],
                          stem=cnn_stem, torchvision=Torchvision("DenseNet121_Weights", "features.conv0",
                                                                 "features.pool0", "classifier", _densenet_keys,
                                                                 conv_init="fan_in")),
    "vit": Family("vit, vit-small, vit-tiny and timm ViTs", "vit", partial(_timm_model, fixed_size=True),
                  VIT_DEFAULTS, VIT_REDUCED, {"patch_size": 4}, lambda model: [f"blocks.{len(model.blocks) - 1}.norm1"],
                  reduced_alias=("vit-tiny", {"depth": 6, "embed_dim": 128, "num_heads": 4}),
                  token_grid=lambda model, spec: (model.num_prefix_tokens,  # class and register tokens; patch grid
                                                  tuple(spec["input_size"] // p for p in model.patch_embed.patch_size)),
                  rollout=True, channels_last=False),
    "timm": Family("other timm models", "cnn", _timm_model, CNN_DEFAULTS, CNN_REDUCED, {}, _stages),
}


def make_deterministic(model: nn.Module) -> list[str]:
    """Replace, in place, the modules whose CUDA backward is not deterministic by exact deterministic
    equivalents; returns what was replaced (for the manifest). Global average pooling is the one
    ResNets, DenseNets and timm CNNs use; no parameters change, so checkpoints load into the plain model."""
    from torch import nn

    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, _torch_modules().GlobalAvgPool())
            replaced.append(f"{name}: AdaptiveAvgPool2d(1) -> mean over H, W")
    return replaced


def pretrained_stats(model: nn.Module, spec: Mapping[str, Any],
                     recorded: Mapping[str, Any] | None = None) -> tuple[tuple, tuple] | None:
    """(mean, std) per channel that the model's starting weights expect, None for a model
    trained from scratch: `recorded`, the preprocessing of the medcli run whose checkpoint the
    weights are (the statistics it trained with); otherwise timm models carry theirs in their
    pretrained config (many ViT weights use 0.5/0.5, not ImageNet's), and torchvision's
    weights use ImageNet's."""
    if not spec.get("pretrained"):
        return None
    try:
        return tuple(float(v) for v in recorded["mean"]), tuple(float(v) for v in recorded["std"])
    except (KeyError, TypeError, ValueError):  # none recorded, or a damaged manifest's
        pass
    import timm

    if resolve(spec["name"])[1] == "timm":
        config = timm.data.resolve_model_data_config(model)
        return tuple(config["mean"]), tuple(config["std"])
    return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD


# -- weights ----------------------------------------------------------------------------------
def _load_imagenet(model: nn.Module, spec: dict) -> nn.Module | None:
    """The model with ImageNet weights, or None (after one warning) when they cannot be had."""
    rec = record(spec["name"])
    if rec.torchvision:
        import torchvision

        url = getattr(torchvision.models, rec.torchvision.weights).IMAGENET1K_V1.url
        state = hub.fetch(spec["name"], url, lambda offline: hub.download_state_dict(url, offline))
        if state is None:
            return None
        return _load_torchvision_state(model, spec, state, "the ImageNet weights", "report this as a medcli bug")
    from huggingface_hub import constants

    return hub.fetch(spec["name"], constants.ENDPOINT, lambda offline: rec.build(spec, pretrained=True))


def read_state_dict(path: Path, damaged_fix: str, data: bytes | None = None) -> dict:
    """The tensors in a torch file (or in `data`, its bytes already read): a bare state dict or a
    checkpoint's "state_dict"/"model".

    Wrapper prefixes from DataParallel ("module.") and torch.compile ("_orig_mod.") are removed so
    such files load into a plain model."""
    import io

    import torch

    try:
        obj = torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, disallowed globals...
        raise UsageError(f"{path} is damaged or not a PyTorch weights file ({hub.one_line(exc)}); {damaged_fix}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UsageError(f"{path} holds no model state dict; {damaged_fix}")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def _read_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"weights file {path} {'is a folder' if path.is_dir() else 'does not exist'}; "
                         "pass the path of a .pt/.pth state dict")
    return read_state_dict(path, WEIGHTS_FIX)


def _load_torchvision_state(model: nn.Module, spec: dict, state: dict, source: str, fix: str) -> nn.Module:
    """Load ImageNet-style torchvision weights: fix old key names, adapt the first conv to the
    stem and the input channels, drop a classifier made for another class count (one that
    takes other features is another architecture's: refused, as for timm models)."""
    import timm

    layout = record(spec["name"]).torchvision
    state = layout.fix_keys(state) if layout.fix_keys else dict(state)
    key, target = f"{layout.first_conv}.weight", model.get_submodule(layout.first_conv).weight
    conv = state.get(key)
    if conv is not None and conv.ndim == 4 and conv.shape != target.shape:
        if conv.shape[1] != target.shape[1]:
            conv = timm.models.adapt_input_conv(target.shape[1], conv, base_chans=conv.shape[1])
        if conv.shape[-2:] != target.shape[-2:]:
            conv = resize_kernel(conv, tuple(target.shape[-2:]))
        state[key] = conv
    head = (f"{layout.classifier}.weight", f"{layout.classifier}.bias")
    fitted, given = model.get_submodule(layout.classifier).weight.shape, state.get(head[0])
    if given is not None and given.shape[0] != fitted[0] and given.shape[1:] == fitted[1:]:  # another class count
        state = {k: v for k, v in state.items() if k not in head}
    else:
        head = ()
    load_state(model, state, spec["name"], source, fix, allowed_missing=head)
    return model


def _load_timm_state(model: nn.Module, spec: dict, state: dict, source: str, fix: str) -> nn.Module:
    """Rebuild a timm model from `state` through timm's own loader.

    timm's checkpoint filter resamples positional embeddings to the new size and adapts the patch
    embedding and the input channels; it drops the head when the class count differs. Because timm
    then loads non-strictly, we first check the keys ourselves: every tensor except the head must be
    there, and nothing else."""
    cfg = model.pretrained_cfg
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)

    def body(keys) -> set[str]:
        return {key for key in keys if key.rsplit(".", 1)[0] not in heads}

    expected, given = body(model.state_dict()), body(state)
    _raise_unfit(spec["name"], source, fix, sorted(expected - given), sorted(given - expected))
    overlay = {"state_dict": state, "num_classes": -1}  # -1: timm always drops the head...
    head_weight = state.get(f"{heads[0]}.weight") if heads else None
    if head_weight is not None and head_weight.shape[0] == spec["num_classes"]:
        overlay["num_classes"] = spec["num_classes"]  # ...unless it fits
    first_conv = cfg.get("first_conv")
    first = state.get(f"{first_conv}.weight") if isinstance(first_conv, str) else None
    if first is not None and first.ndim == 4:  # declare the file's channels so timm adapts them
        overlay["input_size"] = (first.shape[1], *cfg.get("input_size", (3, 224, 224))[1:])
    try:
        return record(spec["name"]).build(spec, pretrained=True, pretrained_cfg_overlay=overlay)
    except RuntimeError as exc:  # shape mismatches raised by load_state_dict
        raise UsageError(f"{source} does not fit model {spec['name']} ({hub.one_line(exc)}); {fix}") from exc


def load_state(model: nn.Module, state: dict, name: str, source: str, fix: str, allowed_missing=()) -> None:
    """load_state_dict that turns every mismatch into one UsageError naming a few keys
    (used for weight files, run checkpoints and resumed training)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), hub.one_line(exc))
        raise UsageError(f"{source} does not fit model {name} ({mismatch}); {fix}") from exc
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    _raise_unfit(name, source, fix, missing, result.unexpected_keys)


def _raise_unfit(name: str, source: str, fix: str, missing: list[str], unexpected: list[str]) -> None:
    if not (missing or unexpected):
        return
    parts = [f"{label} keys {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
             for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    raise UsageError(f"{source} does not fit model {name} ({'; '.join(parts)}); {fix}")


def resize_kernel(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize conv kernels (out, in, kh, kw) bicubically, keeping each kernel's sum.

    The sum over the spatial taps is the kernel's response to a constant image, so after the 7x7 ->
    3x3 transfer each filter still answers flat regions as before. Scaling by the sum ratio would
    blow up ImageNet's zero-mean edge filters (sum ~ 0); instead the kernel is scaled by the area
    ratio and the small remaining difference is spread over the taps."""
    import torch.nn.functional as F

    resized = F.interpolate(weight.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    taps = size[0] * size[1]
    resized = resized * (weight.shape[-2] * weight.shape[-1] / taps)
    resized += (weight.float().sum((2, 3), keepdim=True) - resized.sum((2, 3), keepdim=True)) / taps
    return resized.to(weight.dtype)
