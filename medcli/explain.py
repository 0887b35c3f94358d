"""`medcli explain`: where a trained run looks when it classifies an image.

Two kinds of heat map, one calling convention (`explainer(input_tensor=x, targets=[...])`
returning (B, S, S) maps in [0, 1] at the model's input size):

* CAM methods (Grad-CAM, Grad-CAM++, XGrad-CAM, Eigen-CAM, Layer-CAM, Score-CAM) through the
  `grad-cam` package, used as its authors intend: one CAM object per command (its hooks are
  registered once and released by its context manager), called on batches on the run's
  device, with `ClassifierOutputTarget` targets. For timm ViTs a reshape transform turns the
  patch tokens into a grid.
* Attention rollout (Abnar & Zuidema, 2020) for timm ViTs: `AttentionRollout`, a small class
  of our own (grad-cam has none). It hooks each block's `qkv` projection and recomputes the
  attention weights, because timm's fused attention (`F.scaled_dot_product_attention`) never
  materialises them.

Output goes under `<run>/explain/<method>/`: per sample a PNG (original | heat map | overlay),
a grid per class and `index.json`, all recorded in the manifest's `explain:<method>` stage. On
synthetic data, whose class evidence lives in a known square (`signal_box`), each sample also
gets the share of its heat-map mass inside that square: a built-in check that the maps point
at the evidence.

torch, numpy and matplotlib are imported inside functions: the CLI imports this module for
its help text, which must stay instant.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Sequence

from medcli import console, fileio
from medcli.errors import UsageError
from medcli.names import CAM_METHODS, EXPLAIN_METHODS, EXPLAIN_TARGETS, HEAD_FUSIONS, SPLITS, file_names, short_names
from medcli.run import Run
from medcli.tasks import Task

FUSE_HEADS = dict(zip(HEAD_FUSIONS, (lambda a: a.mean(dim=1), lambda a: a.amax(dim=1), lambda a: a.amin(dim=1))))
DEFAULT_PER_CLASS = 4
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
ROAD_NAME = "ROAD combined (Rong et al. 2022), softmax of the explained class, percentiles 20/40/60/80"
DISPLAY_PX = 224  # per-sample panels are upsampled (nearest) to at least this many pixels
GAP_PX = 4
TITLE_PX = 18
MAPS_FILE = "maps.npz"
LAYER_HELP = (
    "CAM target layer (a module name; an unknown name lists the valid ones). Default: ViTs "
    "blocks[-1].norm1; CNNs the deepest stage whose map is at least "
    f"{MIN_CAM_GRID}x{MIN_CAM_GRID} at the run's input size. For the 28-px ResNet-18 that is "
    "layer3 (7x7), not layer4 (4x4): on synthetic images whose evidence fills the central "
    "quarter, layer3's Grad-CAM put 55-57% of its mass there, layer4's only 45-47% (over half "
    "for 77-83% of the samples vs 0-8%)."
)


# -- layers --------------------------------------------------------------------------------------
def vit_grid(model, spec: dict) -> tuple[int, int]:
    """A timm ViT's patch grid at the run's input size (input size / patch size)."""
    ph, pw = model.patch_embed.patch_size
    return spec["input_size"] // ph, spec["input_size"] // pw


def tokens_to_map(tokens, prefix: int, grid: tuple[int, int]):
    """(B, prefix + h*w, C) ViT tokens -> (B, C, h, w); the class/register tokens are dropped."""
    patches = tokens[:, prefix:, :]
    return patches.reshape(patches.shape[0], grid[0], grid[1], patches.shape[-1]).permute(0, 3, 1, 2)


def cam_layers(model, spec: dict) -> dict[str, tuple[int, int]]:
    """Module names a CAM can target, with the (h, w) grid each one gives.

    Found by one blank forward pass at the run's input size with temporary hooks, so stems,
    pools and patch sizes are accounted for as they are: CNN modules with a spatial map of at
    least 2x2 (a 1x1 map is a constant heat map); ViT modules with one output per token.
    """
    import torch

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
    if spec["family"] == "vit":
        grid = vit_grid(model, spec)
        tokens = model.num_prefix_tokens + grid[0] * grid[1]
        return {name: grid for name, shape in shapes.items() if len(shape) == 2 and shape[0] == tokens}
    return {name: shape[1:] for name, shape in shapes.items() if len(shape) == 3 and min(shape[1:]) >= 2}


def default_layer(model, spec: dict, layers: dict[str, tuple[int, int]]) -> str:
    """ViTs: the last block's norm1 (its tokens feed the final attention). CNNs: the deepest
    stage with a map of at least MIN_CAM_GRID a side (stages: timm's `feature_info`, else the
    model's top-level children), or the finest stage when every one is smaller."""
    if spec["family"] == "vit":
        return f"blocks.{len(model.blocks) - 1}.norm1"
    info = getattr(model, "feature_info", None) or []
    stages = [f["module"] for f in info] or [name for name, _ in model.named_children()]
    stages = [name for name in stages if name in layers]
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

    reshape = None
    if spec["family"] == "vit":
        reshape = partial(tokens_to_map, prefix=model.num_prefix_tokens, grid=vit_grid(model, spec))
    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
    with _silent_score_cam(), cam_class(model=model, target_layers=[model.get_submodule(layer)],
                                        reshape_transform=reshape) as cam:
        cam.batch_size = batch_size
        try:
            yield cam
        except IndexError as exc:
            raise RuntimeError(f"grad-cam {CAM_METHODS[method]} failed: {exc}") from exc


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
                             f"not {type(model).__name__}; use a CAM method such as --method gradcam")
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


def open_explainer(method: str, model, spec: dict, layer: str | None, head_fusion: str, discard_ratio: float,
                   batch_size: int):
    """The explainer for `method` as a context manager (hooks released on exit)."""
    if method == "rollout":
        return AttentionRollout(model, head_fusion, discard_ratio)
    return cam_explainer(method, model, spec, layer, batch_size)


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
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from medcli import augment

    out, scores = [], []
    with console.progress() as bar:
        task = bar.add_task(progress_label, total=int(images.shape[0]), unit="img") if progress_label else None
        for start in range(0, int(images.shape[0]), batch_size):
            batch = images[start:start + batch_size].to(device)
            classes = [int(t) for t in targets[start:start + batch_size]]
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


def road_scorer(model, seed: int, task: Task, percentiles: Sequence[int] = ROAD_PERCENTILES):
    """Faithfulness of maps to `model`: grad-cam's ROAD combined score (Rong et al., "A
    Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022).

    For each percentile p, the p% least relevant pixels are imputed away (noisy linear
    imputation, which leaks no mask shape to the model) and, separately, the p% most
    relevant; the score is the mean over percentiles of (confidence change after removing the
    least relevant - change after removing the most relevant) / 2. Confidence is the softmax
    probability of the explained class (multi-label: the sigmoid probability of the explained
    label; `task.confidence_target`), so CNN and ViT scores share one scale. Higher is more
    faithful; a map no better than chance scores about 0. The imputation noise is seeded.

    Built from grad-cam's own ROAD classes; it equals `ROADCombined` (a test checks it) with
    half the forward passes: the confidence before removal cancels out of the difference, so
    it is not recomputed at every percentile.
    """
    import numpy as np
    import torch
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst

    def after_removal(metric, x, maps, targets):
        return np.mean([metric(p)(x, maps, targets, model, return_diff=False) for p in percentiles], axis=0)

    def score(x, maps, classes):
        targets = [task.confidence_target(k) for k in classes]
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # grad-cam's numpy 2 idioms, not ours to fix
            torch.manual_seed(seed)
            least = after_removal(ROADLeastRelevantFirst, x, maps, targets)
            most = after_removal(ROADMostRelevantFirst, x, maps, targets)
        return (least - most) / 2

    return score


def box_mass(maps, box: Sequence[int]):
    """Share of each map's total mass inside box [y0, y1, x0, x1] (NaN for an all-zero map)."""
    import numpy as np

    y0, y1, x0, x1 = box
    total = maps.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return maps[:, y0:y1, x0:x1].sum(axis=(1, 2)) / total


# -- samples ---------------------------------------------------------------------------------------
def parse_indices(text: str | None) -> list[int] | None:
    """'3,17,42' -> [3, 17, 42]; None stays None."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--indices must be comma-separated sample numbers such as 3,17,42 (got '{text}')") from None
    if not values:
        raise UsageError("--indices is empty; give sample numbers such as 3,17,42")
    return values


def _first_per_class(order, member, per_class: int):
    """The first `per_class` entries of `order` in each class (column of the (N, K) boolean
    `member`), grouped by class, each sample at most once (a multi-label sample counts for
    the first of its labels still short of samples); returns (indices, class of each)."""
    import numpy as np

    taken: set[int] = set()
    indices, groups = [], []
    for k in range(member.shape[1]):
        picked = [int(i) for i in order[member[order, k]] if int(i) not in taken][:per_class]
        taken.update(picked)
        indices += picked
        groups += [k] * len(picked)
    return np.asarray(indices, dtype=np.int64), np.asarray(groups, dtype=np.int64)


def choose_samples(member, per_class: int, seed: int, is_wrong=None, chunk: int = 256):
    """`per_class` samples of each true class (or label: `member` is `Task.indicator` of the
    split's labels), the same ones for the same seed whatever the model; returns (sample
    indices, the class each was chosen for).

    A seeded permutation of the split, then the first `per_class` of each class. With
    `is_wrong` (indices -> mistaken or not) only misclassified samples count: the split is
    predicted chunk by chunk in that order and stops once every class has its share, so
    --only-errors costs a fraction of a full pass when errors are common.
    """
    import numpy as np

    member = np.asarray(member, dtype=bool)
    order = np.random.default_rng(seed).permutation(len(member))
    if is_wrong is None:
        return _first_per_class(order, member, per_class)
    wrong = order[:0]
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        wrong = np.concatenate([wrong, part[is_wrong(part)]])
        if len(_first_per_class(wrong, member, per_class)[0]) == member.shape[1] * per_class:
            break
    return _first_per_class(wrong, member, per_class)


# -- figures -------------------------------------------------------------------------------------
def _as_rgb01(image):
    """uint8 (H, W, C) with 1 or 3 channels -> float32 (H, W, 3) in [0, 1]."""
    import numpy as np

    rgb = image.astype(np.float32) / 255.0
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb


def panels(image, heat) -> tuple:
    """(original, heat map, overlay) as uint8 RGB at the image's size; grad-cam's colouring."""
    import numpy as np
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = _as_rgb01(image)
    return ((rgb * 255).round().astype(np.uint8), show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.0),
            show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.5))


def save_sample_figure(path, image, heat, title: str) -> None:
    """original | heat map | overlay side by side, upsampled (nearest) for visibility, under a
    one-line title (true and predicted class, confidence, method, layer)."""
    import numpy as np
    from PIL import Image, ImageDraw

    parts = panels(image, heat)
    scale = max(1, -(-DISPLAY_PX // max(image.shape[:2])))
    big = [part.repeat(scale, axis=0).repeat(scale, axis=1) for part in parts]
    gap = np.full((big[0].shape[0], GAP_PX, 3), 255, dtype=np.uint8)
    body = np.concatenate([big[0], gap, big[1], gap, big[2]], axis=1)
    canvas = Image.new("RGB", (body.shape[1], body.shape[0] + TITLE_PX), "white")
    canvas.paste(Image.fromarray(body), (0, TITLE_PX))
    ImageDraw.Draw(canvas).text((4, 4), title, fill="black")
    with fileio.atomic_path(path) as tmp:
        canvas.save(tmp)


def save_class_grid(path, title: str, items: Sequence[tuple]) -> None:
    """One class's samples: originals above their overlays, a caption per column.

    `items`: (image uint8 (H, W, C), heat (H, W), caption) per sample.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fixed margins instead of tight_layout, which cost about a second per grid.
    fig, axes = plt.subplots(2, len(items), figsize=(1.8 * len(items) + 0.4, 4.2), squeeze=False,
                             gridspec_kw={"left": 0.02, "right": 0.98, "bottom": 0.02, "top": 0.82,
                                          "wspace": 0.08, "hspace": 0.08})
    for column, (image, heat, caption) in enumerate(items):
        original, _, overlay = panels(image, heat)
        axes[0, column].imshow(original, interpolation="nearest")
        axes[1, column].imshow(overlay, interpolation="nearest")
        axes[0, column].set_title(caption, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    try:
        with fileio.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


# -- the command -----------------------------------------------------------------------------------
def stage_name(method: str) -> str:
    """The manifest stage of one method: explains with different methods write different
    files, so each has its own stage (and lock) and they can run side by side."""
    return f"explain:{method}"



def explain_run(
    run: str | os.PathLike,
    method: str = "gradcam",
    split: str = "test",
    per_class: int | None = None,
    indices: Sequence[int] | None = None,
    only_errors: bool = False,
    target: str = "pred",
    layer: str | None = None,
    checkpoint: str = "best",
    seed: int = 0,
    head_fusion: str = "mean",
    discard_ratio: float = 0.9,
    batch_size: int = 64,
    device: str = "auto",
    root: str | os.PathLike | None = None,
    faithfulness: bool = True,
) -> dict:
    """Explain a run's predictions with `method`; returns the index written to index.json.

    Everything that can be wrong with the options, the run or its data is checked before the
    `explain:<method>` stage starts, so a usage error leaves the manifest untouched.
    """
    import numpy as np

    from medcli import datasets, inference

    _check_options(method, split, per_class, indices, only_errors, target, layer, batch_size)
    run = Run.open(run)
    run.require_trained()
    spec = run.spec
    if method == "rollout" and spec.get("family") != "vit":
        raise UsageError(f"rollout explains ViT attention but run {run.run_id} is a {spec.get('family', 'unknown')} "
                         f"({spec.get('name')}); use a CAM method such as --method gradcam")
    dev = inference.resolve_device(device)
    model = run.load_model(checkpoint, dev)
    layer = None if method == "rollout" else resolve_layer(model, spec, layer)
    explainer = open_explainer(method, model, spec, layer, head_fusion, discard_ratio, batch_size)
    data = run.load_data(root, [split])
    images, labels = data.images[split], data.labels[split]
    task = Task.of(run.dataset["flag"])
    names = list(task.names)
    prep = run.data["preprocess"]
    target_class = _target_class(target, names)

    def probabilities(index) -> np.ndarray:
        logits = inference.predict_logits(model, datasets.as_tensor(images[index]), prep, batch_size=batch_size,
                                          device=dev)
        return task.probs_t(logits).numpy()

    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(labels)]
        if bad:
            raise UsageError(f"--indices {', '.join(map(str, bad))} outside the {split} split (0..{len(labels) - 1})")
        chosen, groups = np.asarray(indices, dtype=np.int64), None
    else:
        is_wrong = (lambda index: task.mistaken(labels[index], probabilities(index))) if only_errors else None
        chosen, groups = choose_samples(task.indicator(labels), per_class or DEFAULT_PER_CLASS, seed, is_wrong)
    if not len(chosen):
        what = "misclassified samples" if only_errors else "samples"
        raise UsageError(f"the {split} split has no {what} to explain; choose another --split"
                         + (" or drop --only-errors" if only_errors else ""))
    probs = probabilities(chosen)
    preds = task.explained_class(probs)
    truth = task.true_class(labels[chosen], probs) if groups is None else groups
    classes = {"pred": preds, "true": truth}.get(target, np.full(len(chosen), target_class))

    out_dir = run.path(f"explain/{method}")
    with run.stage(stage_name(method)) as st:
        st.forget(f"explain/{method}/")
        with explainer as active:
            maps, scores = heatmaps(active, datasets.as_tensor(images[chosen]), prep, classes, batch_size=batch_size,
                                    device=dev, progress_label=f"explain {method}" + (" + ROAD" if faithfulness else ""),
                                    scorer=road_scorer(model, seed, task) if faithfulness else None)
        box = data.record.get("signal_box")
        explained = Explained(split, chosen, images[chosen], truth, preds, probs[np.arange(len(chosen)), preds],
                              classes, maps, box_mass(maps, box) if box else None, scores,
                              label_sets=labels[chosen] if task.multilabel else None)
        caption = f"{method}{f' · {layer}' if layer else ''}"
        samples, grids, files = write_figures(out_dir, caption, explained, names)
        files.append(save_maps(out_dir / MAPS_FILE, explained, run.dataset))
        masses = explained.box_mass
        index = {
            "run": run.run_id, "method": method, "split": split, "checkpoint": checkpoint, "target": target,
            "layer": layer, "seed": seed, "only_errors": only_errors,
            **({"head_fusion": head_fusion, "discard_ratio": discard_ratio} if method == "rollout" else {}),
            "mean_box_mass": _finite(np.nanmean(masses)) if masses is not None and np.isfinite(masses).any() else None,
            "faithfulness": _spread(scores),
            "maps": MAPS_FILE, "samples": samples, "grids": grids,
        }
        fileio.write_json(out_dir / "index.json", index)
        st.add(*files, save=False)
        st.add(out_dir / "index.json")
        st.summary.update(dir=run.relative(out_dir), method=method, split=split, samples=len(samples), target=target,
                          layer=layer, checkpoint=checkpoint, mean_box_mass=index["mean_box_mass"],
                          faithfulness=index["faithfulness"])
    road = index["faithfulness"]
    console.info(f"{method}{f' on {layer}' if layer else ''}: {len(samples)} {split} samples explained"
                 + (f", mean heat-map share in the evidence box {index['mean_box_mass']:.2f}"
                    if index["mean_box_mass"] is not None else "")
                 + (f", ROAD faithfulness {road['mean']:.3f} +- {road['std']:.3f}" if road else ""))
    index["dir"] = str(out_dir)
    return index


@dataclass
class Explained:
    """The explained samples, row-aligned (row i of every array is the same sample)."""

    split: str
    indices: Any  # sample numbers in the split
    images: Any  # uint8 (N, H, W, C)
    labels: Any
    predictions: Any
    confidence: Any  # probability of the predicted class
    targets: Any  # the class each map explains
    maps: Any  # float32 (N, H, W) in [0, 1]
    box_mass: Any  # share of each map in the dataset's signal_box, or None
    road: Any = None  # ROAD faithfulness of each map (`road_scorer`), or None
    label_sets: Any = None  # multi-label: every sample's 0/1 labels (`labels` is the one it stands for)


def write_figures(out_dir, caption: str, ex: Explained, names: Sequence[str]) -> tuple[list[dict], dict, list]:
    """One titled PNG per sample and one grid per true class; returns (index rows, grids,
    files). `caption`: the method (and layer) named in every title."""
    import numpy as np

    slugs = file_names(names)
    # multi-label: a sample is named by its whole set of labels; one without any (no finding,
    # common in ChestMNIST) stands for no label and joins no per-label grid
    present = ([[int(ex.labels[row])] for row in range(len(ex.indices))] if ex.label_sets is None
               else [np.flatnonzero(labels).tolist() for labels in ex.label_sets])
    in_grids = [row for row in range(len(ex.indices)) if present[row]]
    classes = sorted(set(int(ex.labels[row]) for row in in_grids))
    samples, grids, files = [], {}, []
    with console.progress() as bar:
        task = bar.add_task("figures", total=len(ex.indices) + len(classes), unit="fig")
        for row, index in enumerate(ex.indices):
            label, pred = (int(ex.labels[row]) if present[row] else None), int(ex.predictions[row])
            true_slug = "+".join(slugs[k] for k in present[row]) or "none"
            name = f"{ex.split}_{index}_gt-{true_slug}_pred-{slugs[pred]}.png"
            true_text = "+".join(names[k] for k in present[row]) or "no finding"
            title = (f"true {true_text} | pred {names[pred]} ({ex.confidence[row]:.2f}) | {caption}"
                     + (f" | ROAD {ex.road[row]:.3f}" if ex.road is not None else ""))
            save_sample_figure(out_dir / name, ex.images[row], ex.maps[row], title)
            files.append(out_dir / name)
            samples.append({
                "index": int(index), "label": label, "label_name": None if label is None else names[label],
                "prediction": pred,
                "prediction_name": names[pred], "confidence": round(float(ex.confidence[row]), 6),
                "target": int(ex.targets[row]), "file": name,
                **({"box_mass": _finite(ex.box_mass[row])} if ex.box_mass is not None else {}),
                **({"road": _finite(ex.road[row])} if ex.road is not None else {}),
                **({"true_labels": [names[k] for k in present[row]]} if ex.label_sets is not None else {}),
            })
            bar.advance(task)
        for k in classes:
            rows = [row for row in in_grids if ex.labels[row] == k]
            grids[names[k]] = f"grid_{ex.split}_{slugs[k]}.png"
            save_class_grid(out_dir / grids[names[k]], f"{caption} · {ex.split} · true class {names[k]}", [
                (ex.images[row], ex.maps[row],
                 f"#{ex.indices[row]} pred {slugs[ex.predictions[row]]}\n{ex.confidence[row]:.2f}") for row in rows])
            files.append(out_dir / grids[names[k]])
            bar.advance(task)
    return samples, grids, files


def _check_options(method, split, per_class, indices, only_errors, target, layer, batch_size) -> None:
    checks = [
        (method in EXPLAIN_METHODS, f"unknown --method '{method}'; choose one of {', '.join(EXPLAIN_METHODS)}"),
        (split in SPLITS, f"unknown --split '{split}'; choose one of {', '.join(SPLITS)}"),
        (per_class is None or per_class >= 1, f"--per-class must be at least 1 (got {per_class})"),
        (indices is None or per_class is None, "--indices and --per-class both choose samples; pass one of them"),
        (indices is None or not only_errors, "--only-errors chooses samples itself; drop it or --indices"),
        (layer is None or method != "rollout", "--layer applies to CAM methods; rollout uses every attention block"),
        (batch_size >= 1, f"--batch-size must be at least 1 (got {batch_size})"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def _target_class(target: str, names: Sequence[str]) -> int | None:
    """--target: pred, true, or one class (label) named by number or by name, case-insensitive:
    the full name as medmnist.INFO gives it or the name without its explanation
    ("normal" for BreastMNIST's "normal, benign")."""
    if target in EXPLAIN_TARGETS:
        return None
    if target.isdigit() and int(target) < len(names):
        return int(target)
    brief = short_names(names, width=max(map(len, names)))  # uncut, so every listed name is accepted
    for spelling in (names, brief):
        lowered = [name.lower() for name in spelling]
        if target.lower() in lowered:
            return lowered.index(target.lower())
    raise UsageError(f"unknown --target '{target}'; choose pred (the predicted class), true, or a class of this "
                     f"dataset by number 0..{len(names) - 1} or name ({', '.join(brief)})")


def save_maps(path, ex: Explained, dataset: dict):
    """The raw maps (float16, at the dataset image size) with what they explain, so comparisons
    and re-plots need no model: sample indices, labels, predictions, confidence, targets,
    faithfulness scores, and the dataset they come from."""
    import json

    import numpy as np

    arrays = {"indices": np.asarray(ex.indices, dtype=np.int64), "maps": np.asarray(ex.maps, dtype=np.float16),
              "labels": np.asarray(ex.labels, dtype=np.int64),
              "predictions": np.asarray(ex.predictions, dtype=np.int64),
              "confidence": np.asarray(ex.confidence, dtype=np.float32),
              "targets": np.asarray(ex.targets, dtype=np.int64),
              "meta": np.asarray(json.dumps({"split": ex.split, "flag": dataset.get("flag"), "size": dataset.get("size"),
                                              "md5": dataset.get("md5")}))}
    if ex.road is not None:
        arrays["road"] = np.asarray(ex.road, dtype=np.float32)
    with fileio.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return path


def _spread(values) -> dict | None:
    """{"metric", "mean", "std", "n"} of per-sample scores (None without scores)."""
    import numpy as np

    if values is None or not len(values):
        return None
    return {"metric": ROAD_NAME, "mean": _finite(np.mean(values)), "std": _finite(np.std(values)), "n": len(values)}


def _finite(value) -> float | None:
    value = float(value)
    return round(value, 6) if value == value else None
