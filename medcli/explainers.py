"""The explanation methods: Grad-CAM and its relatives through `grad-cam`, attention rollout
for ViTs, and the ROAD faithfulness score of any map, behind one table, `METHODS`.

Every method has one calling convention (`explainer(input_tensor=x, targets=[...])` returning
(B, S, S) maps in [0, 1] at the model's input size) and is opened as a context manager that
releases its hooks:

* CAM methods (Grad-CAM, Grad-CAM++, XGrad-CAM, Eigen-CAM, Layer-CAM, Score-CAM) through the
  `grad-cam` package, used as its authors intend: one CAM object per command, called on
  batches on the run's device, with `ClassifierOutputTarget` targets. A model family's record
  (`models.Family`) gives the candidate target layers and, for ViTs, the token grid that a
  reshape transform turns into a map.
* Attention rollout (Abnar & Zuidema, 2020) for the families whose record says `rollout`:
  `AttentionRollout`, a small class of our own (grad-cam has none). It hooks each block's
  `qkv` projection and recomputes the attention weights, because timm's fused attention
  (`F.scaled_dot_product_attention`) never materialises them.

A new method is one `Method` row in `METHODS` (and its opener); `explain` asks the row what
the method needs (a target layer, a class to explain, a family that supports it) and never
checks a method by name. Light at import: torch and grad-cam are imported inside functions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import Callable, Iterator, Sequence

from medcli import console
from medcli.errors import UsageError, check_stop

__all__ = [
    "AttentionRollout", "CAM_CLASSES", "DEFAULT_OPTIONS", "DEFAULT_PER_CLASS", "HEAD_FUSIONS", "LAYER_HELP", "METHODS", "MIN_CAM_GRID", "Method",
    "ROAD_PERCENTILES", "box_mass", "cam_layers", "default_layer", "heatmaps", "resolve_layer", "road_name", "road_scorer",
    "CONSTANT_NOTE", "constant", "rollout",
]

HEAD_FUSIONS = ("mean", "max", "min")
DEFAULT_OPTIONS = {"head_fusion": "mean", "discard_ratio": 0.9}  # rollout's options unless asked otherwise
DEFAULT_PER_CLASS = 4  # samples explained per class (or label) unless --per-class or --indices says otherwise
FUSE_HEADS = dict(zip(HEAD_FUSIONS, (lambda a: a.mean(dim=1), lambda a: a.amax(dim=1), lambda a: a.amin(dim=1))))
# The default CNN layer is the deepest stage whose map is at least this many cells a side.
# Evidence (scripts/bench_explain.py --compare-layers; synthetic data whose class evidence fills
# the central quarter; mean share of Grad-CAM mass there, share of samples above one half):
#   28-px ResNet-18 (two seeds)  layer2 14x14: 0.62-0.76 (73-100%)  layer3 7x7: 0.55-0.57 (77-83%)
#                                layer4 4x4: 0.45-0.47 (0-8%)
#   same with max-pool (reduced) layer1 14x14: 0.64  layer2 7x7: 0.58  layer3 4x4: 0.49  layer4 2x2: 0.25
#   timm test_resnet             act1 14x14: 0.53   layer1 7x7: 0.57  layer2 4x4: 0.51  layer3 2x2: 0.25
# A 7x7 map is the coarsest that localised in every model; 4x4 never did. 14x14 did better on
# two models but worse on the third, and its maps for a wrong class also lean on the evidence
# (0.36 vs 0.25 at 7x7, one seed), so the deeper, more class-specific 7x7 stage is the default. It is also
# the grid Grad-CAM was designed with (ImageNet ResNets' last stage at 224 px stays the default).
MIN_CAM_GRID = 7
ROAD_PERCENTILES = (20, 40, 60, 80)  # as in grad-cam's ROAD tutorial: 4 removal levels per direction
# Ties: grad-cam keeps the pixels strictly below a percentile, none when a map's lowest value (a
# ReLU'd Grad-CAM's zero) fills more than p % of it, and then removes the whole image.
def road_name(task) -> str:
    """The faithfulness metric as the index and the pages name it, with the confidence it
    measures for `task` (a `medcli.tasks.Task`)."""
    levels = "/".join(map(str, ROAD_PERCENTILES))
    return (f"ROAD combined (Rong et al. 2022), {task.confidence_name}, percentiles {levels}, tied pixels "
            "ranked in a seeded random order (grad-cam's ROADCombined keeps none of a tie at a percentile)")
LAYER_HELP = (
    "CAM target layer, a module name (an unknown one lists the valid names). Default: the "
    f"deepest of the model family's CAM stages whose map is at least {MIN_CAM_GRID}x{MIN_CAM_GRID} "
    "at the run's input size (else the finest one): for 28-px images layer3 of resnet18 (layer2 "
    "with --reduced), features.denseblock3 of densenet121; for ViTs the last block's norm1."
)


# -- the table ---------------------------------------------------------------------------------
CAM_CLASSES = {  # medcli name -> pytorch_grad_cam class
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
}


@dataclass(frozen=True)
class Method:
    """One explanation method: how to open it and what it needs."""

    name: str
    # (model, spec, layer, options) -> a context manager yielding the explainer; options holds
    # head_fusion, discard_ratio and batch_size
    open: Callable
    uses_layer: bool  # a CAM: explains through one target layer (--layer)
    supported_by: str | None = None  # a `models.Family` flag the run's family must have, or None: any model
    options: tuple[str, ...] = ()  # its own options, recorded in the index
    class_specific: bool = True  # its map depends on the class explained (EigenCAM's and rollout's do not)

    def supports(self, spec: dict) -> bool:
        """Whether the model a spec describes can be explained this way (its family record's flag)."""
        from medcli import models

        return self.supported_by is None or bool(getattr(models.spec_record(spec), self.supported_by))

    def check_model(self, spec: dict, run_id: str, option: str = "--method") -> None:
        """Refuse, in one line, a run whose model family cannot be explained this way; `option`:
        the command's option that chose the method."""
        if not self.supports(spec):
            raise UsageError(f"{self.name} needs a model whose family supports it ({self.supported_by}), but run "
                             f"{run_id} is a {spec.get('family', 'unknown')} ({spec.get('name')}); use a CAM method "
                             f"such as {option} gradcam")


def _open_cam(name: str, model, spec: dict, layer: str, options: dict):
    return cam_explainer(name, model, spec, layer, options["batch_size"])


def _open_rollout(model, spec: dict, layer: None, options: dict):
    return AttentionRollout(model, options["head_fusion"], options["discard_ratio"])


METHODS: dict[str, Method] = {
    **{name: Method(name, partial(_open_cam, name), uses_layer=True, class_specific=name != "eigencam")
       for name in CAM_CLASSES},
    "rollout": Method("rollout", _open_rollout, uses_layer=False, supported_by="rollout",
                      options=("head_fusion", "discard_ratio"), class_specific=False),
}


# -- layers --------------------------------------------------------------------------------------
def tokens_to_map(tokens, prefix: int, grid: tuple[int, int]):
    """(B, prefix + h*w, C) ViT tokens -> (B, C, h, w); the class/register tokens are dropped."""
    patches = tokens[:, prefix:, :]
    return patches.reshape(patches.shape[0], grid[0], grid[1], patches.shape[-1]).permute(0, 3, 1, 2)


def cam_layers(model, spec: dict) -> dict[str, tuple[int, int]]:
    """Module names a CAM can target, with the (h, w) grid each one gives.

    Found by one blank forward pass at the run's input size with temporary hooks, so stems,
    pools and patch sizes are accounted for as they are: CNN modules with a spatial map of at
    least 2x2 (a 1x1 map is a constant heat map); ViT modules with one output per token (the
    family record's `token_grid`).
    """
    import torch

    from medcli import models

    shapes: dict[str, tuple[int, ...]] = {}

    def record(name, module, inputs, output):
        if torch.is_tensor(output):
            shapes[name] = tuple(output.shape[1:])

    handles = [m.register_forward_hook(partial(record, name)) for name, m in model.named_modules() if name]
    blank = torch.zeros(1, spec["in_chans"], spec["input_size"], spec["input_size"],
                        device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            model(blank)
    finally:
        for handle in handles:
            handle.remove()
    token_grid = models.record(spec["name"]).token_grid
    if token_grid:
        prefix, grid = token_grid(model, spec)
        tokens = prefix + grid[0] * grid[1]
        return {name: grid for name, shape in shapes.items() if len(shape) == 2 and shape[0] == tokens}
    return {name: shape[1:] for name, shape in shapes.items() if len(shape) == 3 and min(shape[1:]) >= 2}


def default_layer(model, spec: dict, layers: dict[str, tuple[int, int]]) -> str:
    """The deepest of the family record's CAM stages with a map of at least MIN_CAM_GRID a side,
    or the finest one when every one is smaller (`models.Family.cam_stages`: a CNN's stages, e.g.
    timm's `feature_info`; a ViT's last block's norm1, whose tokens feed the final attention)."""
    from medcli import models

    stages = [name for name in models.record(spec["name"]).cam_stages(model) if name in layers]
    if not stages:
        raise UsageError(f"no default CAM layer for model {spec['name']}; pass --layer, one of: {', '.join(layers)}")
    fine_enough = [name for name in stages if min(layers[name]) >= MIN_CAM_GRID]
    return fine_enough[-1] if fine_enough else max(stages, key=lambda name: min(layers[name]))


def resolve_layer(model, spec: dict, name: str | None) -> str:
    """The CAM target layer's name: `name` checked against the model, or the default."""
    layers = cam_layers(model, spec)
    if name is None:
        return default_layer(model, spec, layers)
    if name not in layers:
        raise UsageError(f"model {spec['name']} has no CAM layer '{name}'; pass --layer, one of: {', '.join(layers)}")
    return name


# -- explainers ----------------------------------------------------------------------------------
@contextmanager
def cam_explainer(method: str, model, spec: dict, layer: str, batch_size: int) -> Iterator:
    """The grad-cam object for `method` on `layer`, its hooks released on exit.

    `batch_size` bounds Score-CAM's masked forward passes (the other CAMs ignore it); its own
    tqdm bar is silenced (medcli's progress bar covers the samples, and --quiet means quiet).
    grad-cam's `__exit__` swallows an IndexError (printing it on stdout); we re-raise it as a
    RuntimeError so a bug can never leave a half-written explanation that looks complete.
    """
    import pytorch_grad_cam

    from medcli import models

    reshape, token_grid = None, models.record(spec["name"]).token_grid
    if token_grid:  # ViT tokens -> a grid
        prefix, grid = token_grid(model, spec)
        reshape = partial(tokens_to_map, prefix=prefix, grid=grid)
    cam_class = _oriented_eigencam() if method == "eigencam" else getattr(pytorch_grad_cam, CAM_CLASSES[method])
    with _silent_score_cam(), cam_class(model=model, target_layers=[model.get_submodule(layer)],
                                        reshape_transform=reshape) as cam:
        cam.batch_size = batch_size
        try:
            yield cam
        except IndexError as exc:
            raise RuntimeError(f"grad-cam {CAM_CLASSES[method]} failed: {exc}") from exc


@cache
def _oriented_eigencam() -> type:  # made on first use: grad-cam is imported late
    """grad-cam's EigenCAM with the sign of each map fixed. It projects the centred activations
    on their first principal direction, whose sign an SVD leaves arbitrary (grad-cam issue 315),
    then keeps the positive part: a map could come out as the negative of the evidence, bright
    on the background (7 of 8 on the tiny test run). Each map is turned so that its cell of
    largest magnitude is positive (sklearn's `svd_flip` rule: the few cells that stand out, not
    the background, carry the weight). Measured on the README's real-data runs (ROAD, 64
    samples): ViT 0.255 against 0.252 as grad-cam leaves it, CNN 0.229 against 0.228; turning
    each map to grow with the activations' magnitude instead halved the ViT's (0.123: a
    LayerNorm's output has nearly the same magnitude everywhere)."""
    import numpy as np
    from pytorch_grad_cam import EigenCAM

    class OrientedEigenCAM(EigenCAM):
        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
            maps = super().get_cam_image(input_tensor, target_layer, target_category, activations, grads, eigen_smooth)
            flat = maps.reshape(len(maps), -1)
            largest = flat[np.arange(len(flat)), np.abs(flat).argmax(axis=1)]
            return maps * np.where(largest < 0, -1, 1).astype(maps.dtype)[:, None, None]

    return OrientedEigenCAM


@contextmanager
def _silent_score_cam() -> Iterator[None]:
    """grad-cam's Score-CAM wraps its masked passes in `tqdm.tqdm(...)` on stderr: hand that
    module a tqdm that is disabled, for the duration only (tqdm's TQDM_DISABLE variable is read
    once at import, too late to set here)."""
    from types import SimpleNamespace
    from unittest import mock

    import tqdm
    from pytorch_grad_cam import score_cam

    with mock.patch.object(score_cam, "tqdm", SimpleNamespace(tqdm=partial(tqdm.tqdm, disable=True))):
        yield


def rollout(attentions: Sequence, head_fusion: str = "mean", discard_ratio: float = 0.0, prefix: int = 1):
    """Attention rollout: per-block weights (B, heads, N, N) -> token flow (B, N, N).

    Per block: heads fused (mean/max/min); the lowest `discard_ratio` of the attention to
    patch tokens set to zero (attention to the `prefix` class/register tokens is kept, so the
    class token's own path survives); the identity added for the residual connection; rows
    renormalised. The blocks' matrices are multiplied from the first to the last. Each row of
    the result sums to one: how token i's final state draws on every input token.
    """
    import torch

    fuse = FUSE_HEADS[head_fusion]
    n = attentions[0].shape[-1]
    eye = torch.eye(n, device=attentions[0].device, dtype=attentions[0].dtype)
    flow = eye.expand(attentions[0].shape[0], n, n)
    for weights in attentions:
        fused = fuse(weights)
        if discard_ratio > 0:
            fused = _discard_lowest(fused, discard_ratio, prefix)
        fused = fused + eye
        flow = (fused / fused.sum(dim=-1, keepdim=True)) @ flow
    return flow


def _discard_lowest(fused, ratio: float, prefix: int):
    """Zero the lowest `ratio` of each (N, N) matrix's attention to the patch tokens."""
    import torch

    b, n, _ = fused.shape
    patches = fused[:, :, prefix:].reshape(b, -1)
    drop = int(patches.shape[1] * ratio)
    if drop == 0:
        return fused
    patches = patches.scatter(1, patches.topk(drop, dim=1, largest=False).indices, 0.0)
    return torch.cat([fused[:, :, :prefix], patches.view(b, n, n - prefix)], dim=2)


class AttentionRollout:
    """Attention rollout for timm ViTs, called like a grad-cam object.

    Inside `with AttentionRollout(model) as explainer:` a forward hook on every block's
    `attn.qkv` recomputes softmax(q k^T * scale) (after the block's q/k norms) from the
    projection's output; this works whether or not timm fuses the attention. `rollout` then
    follows the class token back through the blocks; its row over the patch tokens, on the
    patch grid, upsampled to the input size and min-max scaled to [0, 1], is the map. The map
    explains the class token's information flow, not a class: `targets` is accepted for a
    grad-cam-compatible call and ignored. The hooks exist only inside the `with` block.
    """

    def __init__(self, model, head_fusion: str = "mean", discard_ratio: float = 0.9):
        needed = ("qkv", "num_heads", "scale", "q_norm", "k_norm")
        self.attentions = [getattr(block, "attn", None) for block in getattr(model, "blocks", [])]
        if (not self.attentions or getattr(model, "cls_token", None) is None
                or not all(all(hasattr(attn, key) for key in needed) for attn in self.attentions)):
            raise UsageError(f"attention rollout needs a timm ViT with a class token and qkv attention, "
                             f"not {type(model).__name__}; use a CAM method such as gradcam")
        if head_fusion not in HEAD_FUSIONS:
            raise UsageError(f"unknown --head-fusion '{head_fusion}'; choose one of {', '.join(HEAD_FUSIONS)}")
        if not 0 <= discard_ratio < 1:
            raise UsageError(f"--discard-ratio must be in [0, 1) (got {discard_ratio})")
        self.model = model
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio
        self.prefix = model.num_prefix_tokens
        self.weights: list = []
        self._handles: list = []

    def __enter__(self) -> "AttentionRollout":
        self._handles = [attn.qkv.register_forward_hook(partial(self._record, attn)) for attn in self.attentions]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.weights = []

    def _record(self, attn, module, inputs, output) -> None:
        b, n, _ = output.shape
        q, k, _ = output.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        self.weights.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))

    def __call__(self, input_tensor, targets=None):
        import torch
        import torch.nn.functional as F

        if not self._handles:
            raise RuntimeError("AttentionRollout is called outside its 'with' block")
        self.weights = []
        with torch.no_grad():
            self.model(input_tensor)
            flow = rollout(self.weights, self.head_fusion, self.discard_ratio, self.prefix)
        self.weights = []
        b, _, height, width = input_tensor.shape
        ph, pw = self.model.patch_embed.patch_size
        grid = flow[:, 0, self.prefix:].reshape(b, 1, height // ph, width // pw)
        maps = F.interpolate(grid.float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        low = maps.amin(dim=(1, 2), keepdim=True)
        high = maps.amax(dim=(1, 2), keepdim=True)
        return ((maps - low) / (high - low + 1e-7)).cpu().numpy()


def heatmaps(explainer, images, prep: dict, targets, *, batch_size: int, device, progress_label: str | None = None,
             scorer=None):
    """Heat maps in [0, 1] for uint8 images (N, C, H, W), as float32 (N, H, W), and with
    `scorer` the faithfulness score of each map (else None).

    Each batch is preprocessed exactly as in training (`augment.preprocess`, to the model's
    input size) and explained; `scorer(input batch, maps at input size, targets)` sees what
    the model saw. The maps are then resized back to (H, W), the images' own size, so they
    overlay the dataset image pixel for pixel.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from medcli import augment

    # Score-CAM makes every masked copy of its whole input at once (images x channels of the
    # layer x the image): one image at a time, its copies `batch_size` per forward pass
    step = 1 if isinstance(explainer, ScoreCAM) else batch_size
    out, scores = [], []
    with console.progress() as bar:
        task = bar.add_task(progress_label, total=int(images.shape[0]), unit="img") if progress_label else None
        for start in range(0, int(images.shape[0]), step):
            check_stop()
            batch = images[start:start + step].to(device)
            classes = [int(t) for t in targets[start:start + step]]
            x = augment.preprocess(batch, prep)
            raw = np.asarray(explainer(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in classes]),
                             dtype=np.float32)
            if scorer is not None:
                scores.append(np.asarray(scorer(x, raw, classes), dtype=np.float64))
            maps = torch.from_numpy(raw)
            size = tuple(batch.shape[-2:])
            if tuple(maps.shape[-2:]) != size:
                maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False,
                                     antialias=maps.shape[-1] > size[-1])[:, 0]
            out.append(maps.clamp_(0, 1).numpy())
            if task is not None:
                bar.advance(task, int(batch.shape[0]))
    return np.concatenate(out), (np.concatenate(scores) if scorer is not None else None)


def road_scorer(model, seed: int, task, samples: Sequence[int] | None = None):
    """Faithfulness of maps to `model`: the ROAD combined score (Rong et al., "A Consistent and
    Efficient Evaluation Strategy for Attribution Methods", ICML 2022) as grad-cam's
    `ROADCombined` computes it, its imputation solved on the model's device (`medcli.road`).

    At percentile p the p % most relevant pixels are kept and the rest imputed away (noisy
    linear imputation, which leaks no mask shape to the model) and, separately, the p % least
    relevant are kept: each removes 100 - p % of the image. The score is the mean over
    percentiles of (confidence after removing the least relevant - after removing the most
    relevant) / 2. Confidence is the softmax probability of the explained class (multi-label:
    the sigmoid probability of the explained label; `task.confidence_target`), so CNN and ViT
    scores share one scale. Higher is more faithful; a map no better than chance scores about 0.
    The noise and the order of tied pixels are seeded (`road_name`: ties are where medcli differs
    from grad-cam). The confidence before removal cancels out of the difference, so it is not
    computed. With `samples` (an id per image, in the order the batches come) each image draws
    its own (`road.perturbed`): its score does not change with the batch size or the other
    images explained; without, one stream as grad-cam's (its oracle tests).
    """
    import torch

    from medcli import road

    scored = [0]  # images scored so far: where the next batch's ids start

    def score(x, maps, classes):
        targets = [task.confidence_target(k) for k in classes]
        confidences: list = []
        ids = None if samples is None else list(samples[scored[0]:scored[0] + len(classes)])
        if ids is not None and len(ids) != len(classes):
            raise ValueError(f"road_scorer: {len(samples)} sample ids for more than {scored[0]} images")
        scored[0] += len(classes)
        with torch.no_grad():
            for images in road.perturbed(x, maps, ROAD_PERCENTILES, seed, ids):
                for start in range(0, len(images), len(classes)):
                    done = len(confidences)
                    outputs = model(images[start:start + len(classes)])
                    confidences += [targets[(done + i) % len(classes)](out) for i, out in enumerate(outputs)]
        after = torch.stack(confidences).float().cpu().numpy().reshape(2, len(ROAD_PERCENTILES), len(classes))
        least, most = after.mean(axis=1)
        return (least - most) / 2

    return score


CONSTANT_NOTE = "constant map: no information"  # what a figure of such a map says


def constant(maps):
    """Which of `maps` (N, H, W) hold one value everywhere: they show nothing, and ROAD would
    rank their pixels by its tie-breaking noise alone (a random removal)."""
    import numpy as np

    maps = np.asarray(maps)
    return np.ptp(maps.reshape(len(maps), -1), axis=1) == 0


def box_mass(maps, box: Sequence[int]):
    """Share of each map's total mass inside box [y0, y1, x0, x1] (NaN for an all-zero map)."""
    import numpy as np

    y0, y1, x0, x1 = box
    total = maps.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return maps[:, y0:y1, x0:x1].sum(axis=(1, 2)) / total
