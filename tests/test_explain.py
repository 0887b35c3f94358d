"""`medcli explain`: heat maps are well formed, point at the evidence, release their hooks,
and bad usage ends in one line with exit code 2.

The evidence tests use the synthetic dataset, whose class signal lives only in the central
square `signal_box` (25% of the image): a map that ignored the image would put about 25% of
its mass there. A trained CNN's Grad-CAM must put more than half there, an untrained one's
stays well below. Rollout is class-agnostic and follows the high-contrast square even
untrained, so for it we test the geometry instead (see the rollout evidence test).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medcli import augment, datasets, explain, explainers, fileio, models, names, reports
from medcli.cli import app
from medcli.run import Run

from cli_helpers import one_line_error

runner = CliRunner()
CAM_METHODS = list(explainers.CAM_CLASSES)


@pytest.fixture(scope="module")
def cnn(tiny_run):
    from medcli.run import Run

    run = Run.open(tiny_run)
    return run.load_model("best", "cpu"), run.spec


@pytest.fixture(scope="module")
def vit():
    """A randomly initialised tiny ViT (4-px patches: a 7x7 grid plus the class token)."""
    torch.manual_seed(0)
    model, spec = models.create("timm:test_vit", 8, 3, 28, patch_size=4)
    return model.eval(), spec


@pytest.fixture(scope="module")
def sample_images(synthetic_root):
    """Four synthetic test images, uint8 (4, 3, 28, 28)."""
    return datasets.as_tensor(datasets.load(synthetic_root, "bloodmnist", 28).images["test"][:4])


PREP = augment.make_prep(28, 3)  # what train wrote for both models
OPTIONS = {"head_fusion": "mean", "discard_ratio": 0.9, "batch_size": 64}


def _maps(model, spec, method, images, targets):
    chosen = explainers.METHODS[method]
    layer = explainers.resolve_layer(model, spec, None) if chosen.uses_layer else None
    with chosen.open(model, spec, layer, OPTIONS) as explainer:
        return explainers.heatmaps(explainer, images, PREP, targets, batch_size=4, device="cpu")[0]


def _preprocessed(images):
    return augment.preprocess(images, PREP)


def _predictions(model, images):
    with torch.no_grad():
        return model(_preprocessed(images)).argmax(1).numpy()


# -- heat maps -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,method", [("cnn", m) for m in CAM_METHODS]
                         + [("vit", m) for m in explainers.METHODS])
def test_heat_maps_are_finite_varied_and_image_sized(family, method, cnn, vit, sample_images, capfd):
    model, spec = cnn if family == "cnn" else vit
    images = sample_images
    if method == "scorecam":  # one masked forward pass per channel: keep it to two images
        images = images[:2]
    maps = _maps(model, spec, method, images, _predictions(model, images))
    assert maps.shape == (len(images), 28, 28)
    assert np.isfinite(maps).all()  # heatmaps clamps to [0, 1]; a NaN would survive it
    assert (maps.std(axis=(1, 2)) > 0.01).all(), "a constant heat map explains nothing"
    assert capfd.readouterr().err == "", "grad-cam's own progress bars stay silent (Score-CAM's tqdm)"


@pytest.mark.parametrize("family,method", [("cnn", "gradcam"), ("vit", "gradcam"), ("vit", "rollout")])
def test_heat_maps_take_the_dataset_image_size_not_the_model_input(family, method, cnn, vit, sample_images):
    model, spec = cnn if family == "cnn" else vit
    images = torch.nn.functional.interpolate(sample_images.float(), size=40).round().to(torch.uint8)
    maps = _maps(model, spec, method, images, _predictions(model, images))
    assert maps.shape == (4, 40, 40) and np.isfinite(maps).all()


def test_default_layers_follow_the_map_size(cnn, vit):
    model, spec = cnn
    layers = explainers.cam_layers(model, spec)
    chosen = explainers.default_layer(model, spec, layers)
    assert min(layers[chosen]) >= explainers.MIN_CAM_GRID  # test_resnet at 28 px: layer1 is 7x7, layer2 4x4
    assert chosen == "layer1" and min(layers["layer2"]) < explainers.MIN_CAM_GRID
    # ResNet-18's stages at 28 px: 28, 14, 7, 4 px; with --reduced's max-pool 14, 7, 4, 2 px
    for overrides, layer in (({}, "layer3"), ({"keep_maxpool": True}, "layer2")):
        resnet, resnet_spec = models.create("resnet18", 8, 3, 28, **overrides)
        assert explainers.resolve_layer(resnet.eval(), resnet_spec, None) == layer
    # DenseNet-121's stages are the children of `features`: dense blocks at 28, 14, 7, 3 px
    # (small stem) or 14, 7, 3, 1 px (the --reduced stem keeps the max-pool)
    for overrides, layer in (({}, "features.denseblock3"), ({"keep_maxpool": True}, "features.denseblock2")):
        densenet, densenet_spec = models.create("densenet121", 8, 3, 28, **overrides)
        assert explainers.resolve_layer(densenet.eval(), densenet_spec, None) == layer
    model, spec = vit
    assert explainers.resolve_layer(model, spec, None) == "blocks.5.norm1"
    # --layer's help names these defaults (review #24: it named one that was not used)
    assert all(text in explainers.LAYER_HELP for text in ("layer3 of resnet18", "layer2 with --reduced",
                                                           "features.denseblock3", "the last block's norm1"))


def test_tokens_to_map_puts_each_patch_token_back_where_its_patch_was(vit, sample_images):
    """Review: the ViT CAM's token reshaping had no geometry check (a transposed grid or an
    off-by-one prefix would pass the map tests). The oracle: timm's patch embedding, a conv
    whose (C, h, w) output it flattens row by row into the tokens after the prefix ones."""
    import copy

    model = copy.deepcopy(vit[0])
    assert isinstance(model.patch_embed.norm, torch.nn.Identity) and isinstance(model.norm_pre, torch.nn.Identity)
    with torch.no_grad():
        model.pos_embed.zero_()  # the tokens entering the blocks are then the class token and the patches'
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = augment.preprocess(sample_images, PREP)
    with torch.no_grad():
        patches = model.patch_embed.proj(x)
        model(x)
    prefix = model.num_prefix_tokens
    assert prefix >= 1 and seen[0].shape[1] == prefix + patches.shape[-2] * patches.shape[-1]
    torch.testing.assert_close(explainers.tokens_to_map(seen[0], prefix, tuple(patches.shape[-2:])), patches)
    grid = torch.arange(2 * 3, dtype=torch.float32).reshape(1, 1, 2, 3)  # not square: a transpose shows
    row_major = torch.cat([torch.full((1, 1, 1), -1.0), grid.flatten(2).transpose(1, 2)], dim=1)
    assert torch.equal(explainers.tokens_to_map(row_major, 1, (2, 3)), grid)


# -- rollout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", list(explainers.HEAD_FUSIONS))
@pytest.mark.parametrize("discard", [0.0, 0.9])
def test_rollout_rows_sum_to_one(fusion, discard, vit, sample_images):
    model, _ = vit
    with explainers.AttentionRollout(model, fusion, discard) as rollout:
        model(_preprocessed(sample_images))
        weights = list(rollout.weights)
    assert len(weights) == len(model.blocks)
    flow = explainers.rollout(weights, fusion, discard, prefix=model.num_prefix_tokens)
    assert flow.shape == (4, 50, 50) and (flow >= 0).all()
    torch.testing.assert_close(flow.sum(-1), torch.ones(4, 50))


def test_rollout_recomputes_the_attention_timm_would_use(vit, sample_images):
    """With fused attention off, timm materialises softmax(q k^T * scale) and hands it to
    attn_drop: our qkv hook must reproduce exactly those weights."""
    model, _ = vit
    seen = []
    handles = [block.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
               for block in model.blocks]
    fused = [block.attn.fused_attn for block in model.blocks]
    try:
        for block in model.blocks:
            block.attn.fused_attn = False
        with explainers.AttentionRollout(model) as rollout, torch.no_grad():
            model(_preprocessed(sample_images))
            ours = list(rollout.weights)
    finally:
        for handle, block, flag in zip(handles, model.blocks, fused):
            handle.remove()
            block.attn.fused_attn = flag
    assert len(ours) == len(seen) == len(model.blocks)
    for mine, timms in zip(ours, seen):
        torch.testing.assert_close(mine, timms)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_score_cam_masks_one_image_at_a_time(cnn, sample_images, monkeypatch):
    """Review: grad-cam's Score-CAM builds the masked copies of its whole input at once (images x
    channels x image: about 20 GB for 64 images of 224 px at a 512-channel layer), so
    --batch-size bounded the forward passes but not the memory. Its input is one image."""
    from pytorch_grad_cam import ScoreCAM

    seen, real = [], ScoreCAM.__call__
    monkeypatch.setattr(ScoreCAM, "__call__", lambda self, input_tensor, **kw: seen.append(len(input_tensor))
                        or real(self, input_tensor, **kw))
    model, spec = cnn
    assert _maps(model, spec, "scorecam", sample_images[:3], [0, 1, 2]).shape[0] == 3
    assert seen == [1, 1, 1]


@pytest.mark.parametrize("family,method", [("cnn", "gradcam"), ("vit", "gradcam"), ("vit", "rollout")])
def test_hooks_are_released_after_use(family, method, cnn, vit, sample_images):
    model, spec = cnn if family == "cnn" else vit
    before = _hook_count(model)
    for _ in range(3):
        _maps(model, spec, method, sample_images, [0, 1, 2, 3])
        assert _hook_count(model) == before
    explainers.cam_layers(model, spec)  # the dry run that measures layers hooks every module
    assert _hook_count(model) == before


# -- evidence --------------------------------------------------------------------------------------
def test_gradcam_on_a_cnn_points_at_the_evidence(tiny_run, tmp_path):
    """End to end through the CLI: most Grad-CAM mass lies in the signal box; files, index and
    manifest agree; an explain of other samples with the same method is refused (review #24:
    `--indices 5` silently replaced 32 samples) unless --overwrite, which replaces the first
    one's files; the same explanation made again needs no --overwrite."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    result = runner.invoke(app, ["explain", str(run), "--method", "gradcam", "--per-class", "4", "--json",
                                 "--no-faithfulness"])
    assert result.exit_code == 0, result.stderr
    index = json.loads(result.stdout)
    masses = [s["box_mass"] for s in index["samples"]]
    assert len(masses) == 32 and index["mean_box_mass"] > 0.5, masses
    assert index["layer"] == "layer1"

    out = run / "explain" / "gradcam"
    sample = index["samples"][0]
    assert sample["file"] == f"test_{sample['index']}_gt-{names.file_names([sample['label_name']])[0]}_pred-" \
                             f"{names.file_names([sample['prediction_name']])[0]}.png"
    assert all((out / s["file"]).is_file() for s in index["samples"]) and len(index["grids"]) == 8
    stage = json.loads((run / "manifest.json").read_text())["stages"]["explain:gradcam"]
    assert stage["status"] == "completed" and "explain/gradcam/index.json" in stage["artefacts"]

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(runner.invoke(app, ["explain", str(run), "--indices", "5"]), 2,
                   "explain/gradcam", "holds maps: 32 test samples (--split test --per-class 4 --seed 0)",
                   "this asks for other samples (--split test --indices 5)", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    again = runner.invoke(app, ["explain", str(run), "--indices", "5", "--overwrite", "--no-faithfulness"])
    assert again.exit_code == 0 and again.stdout.strip() == str(out)
    assert ": 1 test sample explained" in again.stderr
    # review: --overwrite deleted the 32 earlier maps without a word (evaluate and download say what they replace)
    assert f"replacing the earlier explain/gradcam of run {run}: maps of 32 test samples (--split test " \
           "--per-class 4 --seed 0)" in " ".join(again.stderr.split())
    same = runner.invoke(app, ["explain", str(run), "--indices", "5", "--no-faithfulness"])
    assert same.exit_code == 0, same.stderr
    assert "replacing" not in same.stderr  # the same explanation again replaces nothing a user would miss
    second = json.loads((out / "index.json").read_text())
    expected = {s["file"] for s in second["samples"]} | set(second["grids"].values()) | {"index.json", "maps.npz"}
    assert {p.name for p in out.iterdir()} == expected
    stage = json.loads((run / "manifest.json").read_text())["stages"]["explain:gradcam"]
    assert {k.rsplit("/", 1)[1] for k in stage["artefacts"]} == expected


def test_maps_of_another_data_file_or_of_an_unreadable_index_are_not_replaced_unsaid(tiny_run, tmp_path):
    """Review: explaining with --root pointing at another file of the same flag replaced the
    earlier maps (other images under the same sample numbers) with only a warning, and an
    unreadable index.json let any explanation replace the maps it described."""
    from medcli.run import Run

    run = shutil.copytree(tiny_run, tmp_path / "run")
    args = ["explain", str(run), "--indices", "0,1", "--no-faithfulness"]
    assert runner.invoke(app, args).exit_code == 0
    source = Path(Run.open(run).dataset["path"])
    other = tmp_path / "other" / source.name
    other.parent.mkdir()
    arrays = dict(np.load(source))
    arrays["test_images"] = arrays["test_images"][:, ::-1].copy()
    np.savez_compressed(other, **arrays)
    out = run / "explain" / "gradcam"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(runner.invoke(app, [*args, "--root", str(other.parent)]), 2,
                   "holds maps: data file md5 ", "this asks for data file md5 ", "--overwrite")
    (out / "index.json").write_text("{ damaged")
    one_line_error(runner.invoke(app, [*args, "--target", "true"]), 2,
                   "explain/gradcam/index.json of run", "is unreadable (JSONDecodeError)", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "index.json"} == \
        {name: data for name, data in before.items() if name != "index.json"}


def test_an_untrained_cnn_does_not_point_at_the_evidence(synthetic_root):
    """The control for the test above: the same architecture untrained keeps well under half
    of its Grad-CAM mass in the square, so that test measures learning, not image contrast."""
    data = datasets.load(synthetic_root, "bloodmnist", 28)
    images = datasets.as_tensor(data.images["test"][:32])
    torch.manual_seed(0)
    model, spec = models.create("timm:test_resnet", 8, 3, 28)
    model.eval()
    maps = _maps(model, spec, "gradcam", images, _predictions(model, images))
    assert np.nanmean(explainers.box_mass(maps, data.record["signal_box"])) < 0.4


def test_eigencam_maps_point_at_the_evidence_not_at_the_background(cnn, synthetic_root):
    """Review: grad-cam's Eigen-CAM keeps the positive part of a projection whose sign the SVD
    leaves arbitrary; on the tiny run 7 of 8 maps were the negative of the evidence square (1 %
    of the mass in it). Every map now grows with the activations."""
    data = datasets.load(synthetic_root, "bloodmnist", 28)
    images = datasets.as_tensor(data.images["test"][:32])
    model, spec = cnn
    masses = explainers.box_mass(_maps(model, spec, "eigencam", images, _predictions(model, images)),
                                 data.record["signal_box"])
    assert np.nanmean(masses) > 0.5 and np.nanmin(masses) > 0.25, masses  # a uniform map holds 0.25


def test_rollout_follows_the_evidence_square_where_it_is(vit, synthetic_root):
    """Rollout is class-agnostic and, on this data, highlights the high-contrast square even in
    an untrained ViT (0.53-0.81 of the mass in it for three random inits; a trained one: 0.65),
    so "after training it points at the square" could not fail. What can fail is the geometry:
    with the square moved right by a quarter, the map must follow it there, not to the
    transposed or mirrored place (a wrong token order, prefix or grid would)."""
    data = datasets.load(synthetic_root, "bloodmnist", 28)
    y0, y1, x0, x1 = data.record["signal_box"]
    shift = (x1 - x0) // 2
    images = datasets.as_tensor(np.roll(data.images["test"][:16], shift, axis=2))
    model, spec = vit
    maps = _maps(model, spec, "rollout", images, [0] * 16)
    moved = np.nanmean(explainers.box_mass(maps, [y0, y1, x0 + shift, x1 + shift]))
    transposed = np.nanmean(explainers.box_mass(maps, [x0 + shift, x1 + shift, y0, y1]))
    mirrored = np.nanmean(explainers.box_mass(maps, [y0, y1, x0 - shift, x1 - shift]))
    assert moved > transposed + 0.1 and moved > mirrored + 0.1, (moved, transposed, mirrored)


# -- faithfulness ----------------------------------------------------------------------------------
def test_road_ranks_a_trained_models_gradcam_above_random_and_untrained_maps(tiny_run):
    """The sanity checks of Adebayo et al. (2018) applied to the score: on the trained model,
    its own Grad-CAM must be more faithful (higher ROAD) than random maps and than the
    Grad-CAM of the same architecture with randomised weights."""
    run = Run.open(tiny_run)
    data = run.load_data()
    images = datasets.as_tensor(data.images["test"][:24])
    prep = run.data["preprocess"]
    model = run.load_model("best", "cpu")
    targets = _predictions(model, images)
    scorer = explainers.road_scorer(model, seed=0, task=datasets.task("bloodmnist"))

    def road(maps):
        return float(np.mean(scorer(augment.preprocess(images, prep), maps.astype(np.float32), targets)))

    layer = explainers.resolve_layer(model, run.spec, None)
    with explainers.METHODS["gradcam"].open(model, run.spec, layer, OPTIONS) as cam:
        trained, scores = explainers.heatmaps(cam, images, prep, targets, batch_size=24, device="cpu", scorer=scorer)
    torch.manual_seed(1)
    untrained = models.rebuild(run.spec).eval()
    with explainers.METHODS["gradcam"].open(untrained, run.spec, layer, OPTIONS) as cam:
        randomised = explainers.heatmaps(cam, images, prep, targets, batch_size=24, device="cpu")[0]
    noise = np.random.default_rng(0).random(trained.shape).astype(np.float32)
    assert np.mean(scores) == pytest.approx(road(trained), abs=1e-6)  # the scorer inside heatmaps is the same
    assert road(trained) > road(noise) + 0.02 and road(trained) > road(randomised) + 0.02, \
        (road(trained), road(noise), road(randomised))


def test_road_scorer_equals_grad_cams_road_combined(tiny_run):
    """The oracle: grad-cam's own ROADCombined with the same percentiles, target and seed, on
    maps without ties (where medcli ranks tied pixels differently: tests/test_road.py)."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    run = Run.open(tiny_run)
    model = run.load_model("best", "cpu")
    x = augment.preprocess(datasets.as_tensor(run.load_data().images["test"][:6]), run.data["preprocess"])
    maps = (np.stack([np.random.default_rng(k).permutation(784) for k in range(6)]) / 784).reshape(6, 28, 28)
    maps = maps.astype(np.float32)
    classes = [0, 1, 2, 3, 4, 5]
    ours = explainers.road_scorer(model, seed=5, task=datasets.task("bloodmnist"))(x, maps, classes)
    torch.manual_seed(5)
    theirs = ROADCombined(percentiles=list(explainers.ROAD_PERCENTILES))(
        x, maps, [ClassifierOutputSoftmaxTarget(k) for k in classes], model)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_explain_records_faithfulness_and_raw_maps(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    result = runner.invoke(app, ["explain", str(run), "--per-class", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    index = json.loads(result.stdout)
    roads = [s["road"] for s in index["samples"] if not s.get("constant")]  # a constant map has no score
    assert len(index["samples"]) == 8 and None not in roads
    assert (index["faithfulness"]["n"], index["faithfulness"]["constant"]) == (len(roads), 8 - len(roads))
    assert index["faithfulness"]["mean"] == pytest.approx(np.mean(roads), abs=1e-5)
    stage = Run.open(run).stages["explain:gradcam"]
    assert stage["summary"]["faithfulness"] == index["faithfulness"]
    stored = np.load(run / "explain" / "gradcam" / "maps.npz")
    assert stored["maps"].shape == (8, 28, 28) and list(stored["indices"]) == [s["index"] for s in index["samples"]]
    assert json.loads(str(stored["meta"]))["flag"] == "bloodmnist"
    assert json.loads(str(stored["meta"]))["selection"] == index["selection"] == "--split test --per-class 1 --seed 0"
    assert "explain/gradcam/maps.npz" in stage["artefacts"]
    # review: no test held the maps to grad-cam itself. The oracle: pytorch_grad_cam's GradCAM on
    # the default layer, the same test images preprocessed, each map of its predicted class
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    opened = Run.open(run)
    model = opened.load_model("best", torch.device("cpu"))
    layer = explainers.resolve_layer(model, opened.spec, None)
    images = datasets.as_tensor(opened.load_data(None, ["test"]).images["test"][stored["indices"]])
    with GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        expected = cam(input_tensor=augment.preprocess(images, opened.data["preprocess"]),
                       targets=[ClassifierOutputTarget(int(k)) for k in stored["predictions"]])
    np.testing.assert_allclose(stored["maps"].astype(np.float32), expected, atol=1e-3)  # maps.npz keeps float16
    assert list(stored["targets"]) == list(stored["predictions"])
    # review: --no-faithfulness silently dropped the stored ROAD scores ('aggregate --metrics road_*' went blank)
    quick = ["explain", str(run), "--per-class", "1", "--no-faithfulness", "--json"]
    one_line_error(runner.invoke(app, quick), 2, "holds maps: with ROAD scores; this asks for without ROAD scores",
                   "--overwrite")
    assert json.loads((run / "explain" / "gradcam" / "index.json").read_text())["faithfulness"] == index["faithfulness"]
    replaced = runner.invoke(app, [*quick, "--overwrite"])
    assert replaced.exit_code == 0 and json.loads(replaced.stdout)["faithfulness"] is None


def test_explaining_with_another_checkpoint_target_or_layer_is_refused_without_overwrite(tiny_run, tmp_path):
    """Review: the guard compared only the samples, so `--checkpoint last --target true --layer
    layer2` silently replaced the best.pt maps. A field an index of an older medcli lacks is
    unknown and refuses nothing."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    first = ["explain", str(run), "--indices", "3,5", "--no-faithfulness"]
    assert runner.invoke(app, first).exit_code == 0
    index_file = run / "explain" / "gradcam" / "index.json"
    before = index_file.read_text()
    other = [*first, "--checkpoint", "last", "--target", "true", "--layer", "layer2"]
    one_line_error(runner.invoke(app, other), 2, "explain/gradcam",
                   "holds maps: best.pt, target pred, at layer1; this asks for last.pt, target true, at layer2: "
                   "pass --overwrite to replace them")
    assert index_file.read_text() == before
    class_name = datasets.class_names("bloodmnist")[3]
    assert runner.invoke(app, [*first, "--target", "3", "--overwrite"]).exit_code == 0
    assert runner.invoke(app, [*first, "--target", class_name.upper()]).exit_code == 0  # the same class
    older = {key: value for key, value in json.loads(index_file.read_text()).items()
             if key not in ("checkpoint", "target", "layer", "faithfulness")}
    index_file.write_text(json.dumps(older))
    assert runner.invoke(app, other).exit_code == 0, "nothing recorded to compare: not refused"
    assert json.loads(index_file.read_text())["checkpoint"] == "last"


def test_an_interrupted_explain_keeps_the_earlier_explanation(tiny_run, tmp_path, monkeypatch):
    """Review: `explain` deleted the method's earlier files and manifest entries before computing
    the new maps, so Ctrl-C (or a crash) during the computation left explain/gradcam/ empty."""
    from medcli import explainers

    run = shutil.copytree(tiny_run, tmp_path / "run")
    args = ["explain", str(run), "--indices", "3,5", "--no-faithfulness"]
    assert runner.invoke(app, args).exit_code == 0
    folder = run / "explain" / "gradcam"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    recorded = json.loads((run / "manifest.json").read_text())["stages"]["explain:gradcam"]["artefacts"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(explainers, "heatmaps", interrupted)
    stopped = runner.invoke(app, [*args, "--overwrite"])
    assert stopped.exit_code == 130  # review: it said "interrupted; run the command again" of a result kept whole
    assert "before it changed any file: its earlier result stands" in " ".join(stopped.stderr.split())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    stage = json.loads((run / "manifest.json").read_text())["stages"]["explain:gradcam"]
    assert stage["artefacts"] == recorded and stage["status"] == "completed"  # aggregate --maps and report use it
    monkeypatch.undo()
    assert runner.invoke(app, ["explain", str(run), "--indices", "4", "--no-faithfulness", "--overwrite"]).exit_code == 0
    names = {p.name for p in folder.iterdir()}
    assert not any(name.startswith("test_3_") or name.startswith("test_5_") for name in names)  # replaced: gone
    artefacts = json.loads((run / "manifest.json").read_text())["stages"]["explain:gradcam"]["artefacts"]
    assert {a.rsplit("/", 1)[1] for a in artefacts} == names


def test_files_of_an_explain_that_failed_while_writing_do_not_outlive_the_next(tiny_run, tmp_path, monkeypatch):
    """Review: an explain that failed writing its grids (disk full) left the sample figures it
    had written unrecorded, and the next explain, which removed only recorded files, kept them
    beside its own index for good."""
    from medcli import reports

    run = shutil.copytree(tiny_run, tmp_path / "run")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reports, "save_class_grid", disk_full)
    assert runner.invoke(app, ["explain", str(run), "--indices", "3,5", "--no-faithfulness"]).exit_code != 0
    monkeypatch.undo()
    folder = run / "explain" / "gradcam"
    assert any(p.name.startswith("test_3_") for p in folder.iterdir())  # written before the failure
    (folder / "notes.txt").write_text("the user's own file: not explain's to remove")
    assert runner.invoke(app, ["explain", str(run), "--indices", "4", "--no-faithfulness", "--overwrite"]).exit_code == 0
    artefacts = json.loads((run / "manifest.json").read_text())["stages"]["explain:gradcam"]["artefacts"]
    assert {p.name for p in folder.iterdir()} == {a.rsplit("/", 1)[1] for a in artefacts} | {"notes.txt"}


# -- samples ---------------------------------------------------------------------------------------
def test_samples_are_seeded_per_class_and_only_errors_picks_mistakes():
    labels = np.arange(200) % 8
    member = labels[:, None] == np.arange(8)
    first, groups = explain.choose_samples(member, 3, seed=1)
    assert np.array_equal(groups, labels[first])
    assert np.array_equal(first, explain.choose_samples(member, 3, seed=1)[0])
    assert not np.array_equal(first, explain.choose_samples(member, 3, seed=2)[0])
    assert np.array_equal(np.bincount(labels[first]), [3] * 8)
    wrong = np.arange(200) % 3 == 0
    predicted = []

    def is_wrong(index):
        predicted.extend(index)
        return wrong[index]

    errors, _ = explain.choose_samples(member, 2, seed=1, is_wrong=is_wrong, chunk=16)
    assert wrong[errors].all() and np.array_equal(np.bincount(labels[errors]), [2] * 8)
    assert len(predicted) < 200, "stops predicting once every class has its errors"


def test_multilabel_samples_stand_for_one_of_their_labels_and_appear_once():
    rng = np.random.default_rng(0)
    member = rng.random((100, 4)) < 0.4
    chosen, groups = explain.choose_samples(member, 5, seed=0)
    assert len(set(chosen.tolist())) == len(chosen)  # no sample twice
    assert member[chosen, groups].all()  # each stands for a label it has
    assert np.array_equal(np.bincount(groups, minlength=4), [5] * 4)


def test_short_names_are_safe_and_distinct():
    classes = datasets.class_names("bloodmnist")
    slugs = names.file_names(classes)
    assert slugs[3] == "immature-granulocytes" and len(set(slugs)) == len(slugs)
    assert names.file_names(["a b", "a-b"]) == ["a-b-0", "a-b-1"]


# -- usage errors ----------------------------------------------------------------------------------
def _one_line_usage_error(args, *needles):
    one_line_error(runner.invoke(app, ["explain", *map(str, args)]), 2, *needles)


def test_rollout_on_a_cnn_is_a_usage_error(tiny_run):
    _one_line_usage_error([tiny_run, "--method", "rollout"], "rollout", "--method gradcam")
    stages = json.loads((tiny_run / "manifest.json").read_text())["stages"]
    assert not any(name.startswith("explain") for name in stages)


def test_rollout_options_given_to_another_method_are_a_usage_error(tiny_run):
    """Review: `--method gradcam --head-fusion max --discard-ratio 5` ran, ignoring both."""
    _one_line_usage_error([tiny_run, "--head-fusion", "max", "--discard-ratio", "0.5"],
                          "--head-fusion, --discard-ratio apply to rollout; gradcam has no such option")


def test_unknown_layer_lists_the_valid_ones(tiny_run):
    _one_line_usage_error([tiny_run, "--layer", "layer9"], "layer9", "layer1", "layer2")


def test_run_without_checkpoint_is_a_usage_error(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "checkpoints" / "best.pt").unlink()
    _one_line_usage_error([run], "checkpoints/best.pt")


@pytest.mark.parametrize("status", ["running", "interrupted", "failed"])
def test_a_run_whose_training_has_not_completed_is_refused(tiny_run, tmp_path, status):
    """Review defect 10: explain used to draw maps from a half-trained checkpoint."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    Run.open(run).update(lambda data: data["stages"]["train"].update(status=status))
    said = ("did not finish", "killed?") if status == "running" else ("no completed train stage", f"({status})")
    _one_line_usage_error([run], *said, "--resume")  # a running stage nobody works on: its process was killed
    assert not (run / "explain").exists()


def test_sample_numbers_outside_the_split_are_a_usage_error(tiny_run):
    _one_line_usage_error([tiny_run, "--indices", "1,999"], "999", "0..63")


# -- comparing maps across runs --------------------------------------------------------------------
def test_agreement_is_one_for_equal_maps_and_chance_for_unrelated_ones():
    from medcli import maps

    rng = np.random.default_rng(0)
    a = rng.random((200, 28, 28))
    rho, iou = maps.agreement(a, a.copy())
    assert np.allclose(rho, 1) and np.allclose(iou, 1)
    rho, iou = maps.agreement(a, rng.random((200, 28, 28)))
    assert abs(rho.mean()) < 0.02 and abs(iou.mean() - 0.2 / 1.8) < 0.01  # two random 20% sets: IoU 1/9
    rho, _ = maps.agreement(a, -a)
    assert np.allclose(rho, -1)


@pytest.fixture(scope="module")
def explained_pair(tiny_run, tmp_path_factory):
    """Two copies of the tiny run, explained with gradcam (no ROAD: fast) and one also with eigencam."""
    root = tmp_path_factory.mktemp("explained")
    runs = [shutil.copytree(tiny_run, root / name) for name in ("a", "b")]
    for run in runs:
        assert runner.invoke(app, ["explain", str(run), "--per-class", "2", "--no-faithfulness"]).exit_code == 0
    assert runner.invoke(app, ["explain", str(runs[1]), "--method", "eigencam", "--per-class", "2",
                               "--no-faithfulness"]).exit_code == 0
    return runs


def test_aggregate_maps_lines_up_the_same_samples_across_runs(explained_pair, tmp_path):
    a, b = explained_pair
    result = runner.invoke(app, ["aggregate", str(a), str(b), "--maps", "--out", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["samples"] == 16 and len(summary["columns"]) == 3 and len(summary["pairs"]) == 3
    same = next(p for p in summary["pairs"] if p["a"].endswith("gradcam") and p["b"].endswith("gradcam"))
    assert same["spearman"] == pytest.approx(1.0) and same["top20_iou"] == pytest.approx(1.0)  # same model and samples
    assert set(same["per_class"]) == set(datasets.class_names("bloodmnist"))
    assert {p.name for p in tmp_path.iterdir()} == {"maps_agreement.csv", "maps_agreement.json", "maps_compare.png"}
    from PIL import Image

    with Image.open(tmp_path / "maps_compare.png") as figure:  # review #24: a 540 x 5,273 px strip
        assert figure.height < 2000 and figure.width < 2000, figure.size
    only = runner.invoke(app, ["aggregate", str(a), str(b), "--maps", "--method", "gradcam", "--out", str(tmp_path),
                               "--format", "json"])
    assert len(json.loads(only.stdout)["pairs"]) == 1


def test_a_damaged_maps_file_is_a_one_line_error_naming_it(explained_pair, tmp_path):
    """Review: a cut-short maps.npz ended `aggregate --maps` with "unexpected BadZipFile"."""
    from medcli.run import Run

    a, b = explained_pair
    b = shutil.copytree(b, tmp_path / "b")
    maps_file = b / "explain" / "gradcam" / "maps.npz"
    maps_file.write_bytes(maps_file.read_bytes()[:100])
    args = ["aggregate", str(a), str(b), "--maps", "--method", "gradcam", "--out", str(tmp_path / "cmp")]
    one_line_error(runner.invoke(app, args), 2, "explain/gradcam/maps.npz of run", "is not the file this run wrote",
                   "--method gradcam --overwrite")
    Run.open(b).update(lambda data: data["stages"]["explain:gradcam"]["artefacts"].pop("explain/gradcam/maps.npz"))
    one_line_error(runner.invoke(app, args), 2, "explain/gradcam/maps.npz of run", "is damaged (BadZipFile)",
                   "--method gradcam --overwrite")
    np.savez(maps_file, meta=np.array("{}"))  # a readable archive without its maps
    one_line_error(runner.invoke(app, args), 2, "explain/gradcam/maps.npz of run", "is damaged (it holds no maps)")


def test_the_maps_figure_has_no_empty_sample_slots(explained_pair, tmp_path, monkeypatch):
    """Review: four sample slots per row were reserved when each class had two samples, so the
    right half of maps_compare.png was blank (and its text the smaller in print)."""
    from medcli import maps, reports

    kept, real = [], reports.save_figure
    monkeypatch.setattr(reports, "save_figure", lambda fig, path, dpi=None: kept.append(fig) or real(fig, path, dpi))
    a, b = explained_pair
    assert runner.invoke(app, ["aggregate", str(a), str(b), "--maps", "--method", "gradcam",
                               "--out", str(tmp_path)]).exit_code == 0
    block = 3 * maps.TILE_IN + 2 * maps.GAP_IN  # the image and two runs' overlays
    assert kept[0].get_figwidth() == pytest.approx(maps.LABEL_IN + 2 * block + maps.BLOCK_GAP_IN + 0.1)


def test_a_multilabel_map_without_a_decision_is_captioned_top_not_as_a_prediction(tmp_path, monkeypatch):
    """Review: the maps figure captioned a chest image's most probable label at 0.38 as the
    prediction ("A hernia 0.38") where no label reached 0.5 (explain says "top ... no label
    found")."""
    from medcli import maps, reports

    kept, real = [], reports.save_figure
    monkeypatch.setattr(reports, "save_figure", lambda fig, path, dpi=None: kept.append(fig) or real(fig, path, dpi))
    heat = np.random.default_rng(0).random((2, 28, 28)).astype(np.float16)
    columns = [maps.Column(name, "gradcam", {}, {"maps": heat, "predictions": np.array([0, 1]),
                                                 "confidence": np.array([0.38, 0.9], dtype=np.float32),
                                                 "decided": np.array([False, True])}, tmp_path / name)
               for name in ("a", "b")]
    scores = [("AB", np.array([1.0, 1.0]), np.array([1.0, 1.0]))]
    images = np.zeros((2, 28, 28, 3), dtype=np.uint8)
    maps.save_figure(tmp_path / "m.png", columns, [[0, 1], [0, 1]], [[True, True], [True, True]], [0, 1],
                     np.array([0, 1]), scores, images, ["hernia", "mass"], "t")
    titles = [ax.get_title() for ax in kept[0].axes]
    assert "A top hernia 0.38" in titles and "A mass 0.90" in titles
    legend = " ".join(" ".join(t.get_text() for t in kept[0].texts).split())
    assert "\"top\": the most probable label, where no label reached 0.5" in legend


def test_many_runs_maps_figure_keeps_its_resolution_and_every_pair_score(tmp_path, monkeypatch):
    """Review: six runs have 15 pairs, their scores were 15 lines under each sample: the figure
    grew 28 in high and was saved at 72 dpi to stay 2,000 px high. The scores now stand side
    by side as far as a sample's block is wide, none overlapping another."""
    from itertools import combinations

    from medcli import maps, reports

    kept, real = [], reports.save_figure
    monkeypatch.setattr(reports, "save_figure", lambda fig, path, dpi=None: kept.append((fig, dpi)) or real(fig, path, dpi))
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 2)
    columns = [maps.Column(f"r{c}", "gradcam", {}, {"maps": rng.random((16, 28, 28)).astype(np.float16),
                                                    "predictions": labels, "confidence": rng.random(16)}, tmp_path)
               for c in range(6)]
    scores = [(maps._letter(a) + maps._letter(b), rng.random(16), rng.random(16)) for a, b in combinations(range(6), 2)]
    maps.save_figure(tmp_path / "m.png", columns, [list(range(16))] * 6, [np.ones(16, bool)] * 6, list(range(16)),
                     labels, scores, np.zeros((16, 28, 28, 3), np.uint8), [*datasets.class_names("bloodmnist")], "t")
    (fig, dpi), = kept
    assert dpi == maps.DPI  # not scaled down
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts if "\u03c1" in t.get_text()]
    text = "\n".join(s for s, _ in boxes)
    assert all(text.count(f"{pair}  \u03c1") == 8 for pair, _, _ in scores)  # every pair, in each class's row
    assert not any(a.overlaps(b) for a, b in combinations([box for _, box in boxes], 2))
    assert max(box.x1 for _, box in boxes) <= fig.bbox.x1


def test_the_maps_figure_is_readable_printed_at_a_page_width(explained_pair, tmp_path, monkeypatch):
    """Review: with four samples a class the figure was 13.3 in wide with 6-pt tile titles:
    3.3 pt printed at a page's width. Three runs side by side leave room for one sample a class,
    and the legend says the figure shows the first; every text prints at reports.MIN_PRINT_PT
    or more."""
    from matplotlib.text import Text

    from medcli import maps, reports

    kept, real = [], reports.save_figure
    monkeypatch.setattr(reports, "save_figure", lambda fig, path, dpi=None: kept.append(fig) or real(fig, path, dpi))
    a, b = explained_pair
    c = shutil.copytree(b, tmp_path / "c")
    assert runner.invoke(app, ["aggregate", str(a), str(b), str(c), "--maps", "--method", "gradcam",
                               "--out", str(tmp_path / "cmp")]).exit_code == 0
    (fig,) = kept
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert min(sizes) * min(1.0, reports.PRINT_WIDTH_IN / fig.get_figwidth()) >= reports.MIN_PRINT_PT
    block = 4 * maps.TILE_IN + 3 * maps.GAP_IN  # the image and three runs' overlays: one a class
    assert fig.get_figwidth() == pytest.approx(maps.LABEL_IN + block + 0.1)
    assert "Shown: the first of each class's samples" in " ".join(t.get_text() for t in fig.texts)


def test_aggregate_maps_prints_its_files_and_says_what_it_replaces(explained_pair, tmp_path):
    """Review: the text output listed no file written (only --format json did), printed Python's
    None, took --format csv/md silently, and a second comparison replaced the first unsaid."""
    a, b = explained_pair
    args = ["aggregate", str(a), str(b), "--maps", "--out", str(tmp_path / "cmp")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    printed = first.stdout.strip().splitlines()
    assert printed[-3:] == [str(tmp_path / "cmp" / name) for name in
                            ("maps_agreement.csv", "maps_agreement.json", "maps_compare.png")]
    assert "None" not in first.stdout and "replacing" not in first.stderr
    again = runner.invoke(app, [*args, "--method", "gradcam"])
    assert again.exit_code == 0 and "replacing the earlier" in " ".join(again.stderr.split())
    assert "--format table or json" in one_line_error(runner.invoke(app, [*args, "--format", "csv"]), 2)


def test_aggregate_maps_bad_input_is_one_line(explained_pair, tiny_run, tmp_path):
    a, b = explained_pair
    other_split = shutil.copytree(tiny_run, tmp_path / "val-run")
    assert runner.invoke(app, ["explain", str(other_split), "--split", "val", "--per-class", "1",
                               "--no-faithfulness"]).exit_code == 0
    taken = {s["index"] for s in json.loads((a / "explain" / "gradcam" / "index.json").read_text())["samples"]}
    other = min(set(range(64)) - taken)
    other_samples = shutil.copytree(tiny_run, tmp_path / "other-samples")
    assert runner.invoke(app, ["explain", str(other_samples), "--indices", str(other),
                               "--no-faithfulness"]).exit_code == 0
    cases = [
        ([str(a), str(other_split)], "different splits"),
        ([str(a), str(other_samples)], f"share no sample (a · gradcam explained --split test --per-class 2 --seed 0; "
                                       f"other-samples · gradcam explained --split test --indices {other})"),
        ([str(a), str(tiny_run)], "no completed explanation"),
        ([str(a)], "at least two explained runs"),
    ]
    other_data = shutil.copytree(b, tmp_path / "other-data")  # review: maps of other images, compared as the same
    maps_file = other_data / "explain" / "gradcam" / "maps.npz"
    with np.load(maps_file) as archive:
        content = {key: archive[key] for key in archive.files}
    content["meta"] = np.array(json.dumps({**json.loads(str(content["meta"])), "md5": "0" * 32}))
    np.savez(maps_file, **content)
    from medcli.run import Run

    sha = fileio.sha256_file(maps_file)  # as an explanation of that data would have recorded it
    Run.open(other_data).update(lambda data: data["stages"]["explain:gradcam"]["artefacts"].__setitem__(
        "explain/gradcam/maps.npz", sha))
    cases.append(([str(a), str(other_data)], "different data files"))
    for args, needle in cases:
        result = runner.invoke(app, ["aggregate", *args, "--maps", "--method", "gradcam", "--out", str(tmp_path / "o")])
        assert needle in one_line_error(result, 2), args
    # review: "explain it first with 'medcli explain RUN'" for a method the run's model cannot have
    no_rollout = runner.invoke(app, ["aggregate", str(a), str(b), "--maps", "--method", "rollout", "--out", str(tmp_path / "o")])
    assert f"rollout does not apply to the model of run {a} (timm:test_resnet); name a method it has: gradcam" \
        in one_line_error(no_rollout, 2)
    unknown = runner.invoke(app, ["aggregate", str(a), str(b), "--maps", "--method", "nosuch", "--out", str(tmp_path / "o")])
    assert "unknown --method nosuch" in one_line_error(unknown, 2) and "gradcam" in unknown.stderr
    assert "--out" in one_line_error(runner.invoke(app, ["aggregate", str(a), str(b), "--maps"]), 2)


def test_a_multilabel_sample_without_findings_is_named_so_and_joins_no_label_grid(tmp_path):
    """ChestMNIST: about half the images carry no label; their figure must not call them
    "true <most probable label>" (Task.true_class's stand-in) nor put them in that label's grid."""
    from medcli.explain import Explained, write_figures

    names = ["effusion", "mass", "edema"]
    ex = Explained(split="test", indices=np.array([4, 7]), images=np.zeros((2, 28, 28, 1), np.uint8),
                   labels=np.array([1, 1]), predictions=np.array([1, 1]), confidence=np.array([0.9, 0.8]),
                   targets=np.array([1, 1]), maps=np.zeros((2, 28, 28), np.float32), box_mass=None,
                   label_sets=np.array([[1, 1, 0], [0, 0, 0]]), decided=np.array([True, False]))
    samples, grids, files = write_figures(tmp_path, "gradcam", ex, names)
    # review: a most probable label below 0.5 was "pred-mass" though no label was found
    assert [s["file"] for s in samples] == ["test_4_gt-effusion+mass_pred-mass.png", "test_7_gt-none_top-mass.png"]
    assert [s["decided"] for s in samples] == [True, False]
    assert samples[1]["label"] is None and samples[1]["true_labels"] == [] and samples[0]["label_name"] == "mass"
    assert list(grids) == ["mass"] and all(f.is_file() for f in files)


def test_a_constant_map_says_it_shows_nothing(tmp_path, monkeypatch):
    """Review: an all-zero Grad-CAM map (a ViT's, often) was drawn as a dark overlay with nothing
    saying the map carries no information."""
    from medcli import reports
    from medcli.explain import Explained, write_figures

    titles, captions = [], []
    monkeypatch.setattr(reports, "save_sample_figure", lambda path, image, heat, title, note=None: titles.append(title))
    monkeypatch.setattr(reports, "save_class_grid", lambda path, title, items, note=None: captions.extend(
        c for _, _, c in items))
    maps = np.zeros((2, 28, 28), np.float32)
    maps[1, 10:15, 10:15] = 1.0
    ex = Explained(split="test", indices=np.array([4, 7]), images=np.zeros((2, 28, 28, 3), np.uint8),
                   labels=np.array([1, 1]), predictions=np.array([1, 1]), confidence=np.array([0.9, 0.8]),
                   targets=np.array([1, 1]), maps=maps, box_mass=None)
    write_figures(tmp_path, "gradcam", ex, ["a", "b"])
    assert titles[0].endswith("| constant map: no information") and "constant" not in titles[1]
    assert captions[0].endswith("(constant map)") and "constant" not in captions[1]


def test_a_samples_road_score_depends_on_neither_the_batch_nor_the_other_samples(tiny_run, tmp_path):
    """Review: one generator was reseeded for every batch, so an image's noise and tie order
    (and its score, by up to 0.1) followed its position in the batch: `--batch-size` and the
    other samples chosen changed the scores. Each sample now draws its own, from (seed, its
    index); explain's scores agree between batch sizes."""
    run = Run.open(tiny_run)
    model = run.load_model("best", "cpu")
    x = augment.preprocess(datasets.as_tensor(run.load_data().images["test"][:6]), run.data["preprocess"])
    maps = np.random.default_rng(0).random((6, 28, 28)).astype(np.float32)
    classes, ids, task = [0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15], datasets.task("bloodmnist")
    whole = explainers.road_scorer(model, seed=0, task=task, samples=ids)(x, maps, classes)
    halves = explainers.road_scorer(model, seed=0, task=task, samples=ids)
    split = np.concatenate([halves(x[:4], maps[:4], classes[:4]), halves(x[4:], maps[4:], classes[4:])])
    alone = explainers.road_scorer(model, seed=0, task=task, samples=ids[3:4])(x[3:4], maps[3:4], classes[3:4])
    np.testing.assert_allclose(split, whole, atol=1e-6)
    np.testing.assert_allclose(alone, whole[3:4], atol=1e-6)
    copies = [shutil.copytree(tiny_run, tmp_path / f"run{b}") for b in (64, 3)]
    scores = []
    for copy, batch in zip(copies, (64, 3)):
        result = runner.invoke(app, ["explain", str(copy), "--per-class", "1", "--batch-size", str(batch), "--json"])
        assert result.exit_code == 0, result.stderr
        scores.append([np.nan if s["road"] is None else s["road"] for s in json.loads(result.stdout)["samples"]])
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-4)  # NaN (a constant map) in the same places


def test_the_top_share_overlap_of_sparse_maps_does_not_count_their_shared_zeros():
    """Review: the top 20 % of a map mostly zero was filled with its zero pixels in raster
    order, the same positions in both maps: maps highlighting disjoint regions scored IoU 0.6,
    and two all-zero maps 1.0. Pixels tied across the top share's edge stay out of it, and a
    constant map has no top share: NaN, as its correlation."""
    from medcli import maps

    rng = np.random.default_rng(0)
    x, y = np.zeros((1, 28, 28), np.float32), np.zeros((1, 28, 28), np.float32)
    x[0, 20:23, 0:13] = rng.random((3, 13)) + 0.1  # 39 pixels on the left
    y[0, 20:23, 14:27] = rng.random((3, 13)) + 0.1  # 39 on the right: nothing in common
    assert maps.agreement(x, y)[1][0] == 0.0 and maps.agreement(x, x.copy())[1][0] == 1.0
    saturated = np.linspace(0, 1, 100).reshape(1, 10, 10)
    saturated[0, :3] = 1.0  # 30 pixels tied at the maximum: the top share, not an empty set
    assert maps.agreement(saturated, saturated.copy())[1][0] == 1.0
    assert np.isnan(maps.agreement(np.where(saturated > 0.5, np.nan, saturated), saturated)[1][0])  # a NaN map
    rho, iou = maps.agreement(np.zeros((1, 28, 28)), np.zeros((1, 28, 28)))
    assert np.isnan(rho[0]) and np.isnan(iou[0])
    dense = rng.random((5, 28, 28))  # no ties: the top share as it always was
    k = round(0.2 * 784)
    expected = [len(set(np.argsort(-a.ravel())[:k]) & set(np.argsort(-b.ravel())[:k])) /
                len(set(np.argsort(-a.ravel())[:k]) | set(np.argsort(-b.ravel())[:k])) for a, b in zip(dense, dense[::-1])]
    np.testing.assert_allclose(maps.agreement(dense, dense[::-1])[1], expected)


def test_a_negative_seed_is_refused_as_a_usage_error(tiny_run):
    """Review: with ROAD's per-sample seeds, `explain --seed -1` ended in "unexpected
    ValueError"; train already refused a negative seed."""
    one_line_error(runner.invoke(app, ["explain", str(tiny_run), "--indices", "0,1", "--seed", "-1"]), 2, "--seed")


def _explain(run, *options: str) -> None:
    result = runner.invoke(app, ["explain", str(run), "--no-faithfulness", *options])
    assert result.exit_code == 0, result.output


def test_runs_of_one_folder_name_under_different_parents_are_told_apart(tiny_run, tmp_path):
    """Review: two runs named alike (a sweep started in the same second into two --runs-dir, or
    copies) shared one row list, so the same model on the same samples agreed at 0.69 (and
    selections of different sizes crashed with an IndexError)."""
    first, second = (shutil.copytree(tiny_run, tmp_path / parent / "b") for parent in ("t5", "t6"))
    _explain(first, "--indices", "41,36,17,0")
    _explain(second, "--indices", "0,17,36,41,5")
    result = runner.invoke(app, ["aggregate", str(first), str(second), "--maps", "--out", str(tmp_path / "o"),
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["columns"] == ["t5/b · gradcam", "t6/b · gradcam"] and summary["samples"] == 4
    assert summary["pairs"][0]["spearman"] == pytest.approx(1.0) and summary["pairs"][0]["top20_iou"] == pytest.approx(1.0)


def test_maps_of_other_targets_or_made_on_data_found_elsewhere_are_checked(tiny_run, synthetic_root, tmp_path):
    """Review: maps of --target 0 were compared with maps of the predictions (same model:
    Spearman -0.16, no word); a run whose data had moved failed after the new CSV and JSON
    had replaced an earlier comparison's (beside its old figure), advising a --root aggregate
    lacked; maps.npz recorded the md5 of the training file, not of the file explained."""
    runs = [shutil.copytree(tiny_run, tmp_path / name) for name in ("a", "b", "c", "d")]
    _explain(runs[0], "--indices", "0,1,2")
    _explain(runs[1], "--indices", "0,1,2", "--target", "0")
    refused = runner.invoke(app, ["aggregate", str(runs[0]), str(runs[1]), "--maps", "--out", str(tmp_path / "o")])
    assert "different targets" in one_line_error(refused, 2, "--target 0", "--target pred")
    _explain(runs[3], "--indices", "0,1,2", "--target", "Basophil")  # review: class 0 spelled otherwise
    _explain(runs[3], "--indices", "0,1,2", "--target", "true", "--method", "eigencam")  # no class: any target
    same = runner.invoke(app, ["aggregate", str(runs[1]), str(runs[3]), "--maps", "--out", str(tmp_path / "s")])
    assert same.exit_code == 0, same.output
    assert "the class-specific maps explain basophil" in same.stdout.splitlines()[0]

    _explain(runs[2], "--indices", "0,1,2")
    for run in runs[::2]:  # the data moved away from where both trained
        Run.open(run).update(lambda data: (data["config"].update(root=str(tmp_path / "gone")),
                                           data["dataset"].update(path=str(tmp_path / "gone" / "x.npz"))))
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "maps_agreement.csv").write_text("earlier\n")
    args = ["aggregate", str(runs[0]), str(runs[2]), "--maps", "--out", str(out)]
    one_line_error(runner.invoke(app, args), 2, "is missing; pass --root DIR")
    assert (out / "maps_agreement.csv").read_text() == "earlier\n" and len(list(out.iterdir())) == 1
    assert runner.invoke(app, [*args, "--root", str(synthetic_root)]).exit_code == 0

    changed = tmp_path / "changed"  # explained on another file: its md5 goes into maps.npz
    changed.mkdir()
    with np.load(synthetic_root / datasets.filename("bloodmnist", 28)) as archive:
        content = {key: archive[key] for key in archive.files}
    content["test_images"][0] = 255 - content["test_images"][0]
    np.savez_compressed(changed / datasets.filename("bloodmnist", 28), **content)
    _explain(runs[2], "--indices", "0,1,2", "--root", str(changed), "--overwrite")  # maps of other images
    with np.load(runs[2] / "explain" / "gradcam" / "maps.npz") as archive:
        meta = json.loads(str(archive["meta"]))
    assert meta["md5"] == fileio.md5_file(changed / datasets.filename("bloodmnist", 28)) != Run.open(runs[2]).dataset["md5"]
    assert meta["target"] == "pred"


def test_a_map_of_another_class_than_the_prediction_says_so(tmp_path, monkeypatch):
    """Review: with --target true or a class, the file name, the title and the grid caption
    named only the prediction; nothing said the map was of platelet."""
    from medcli import reports
    from medcli.explain import Explained, write_figures

    titles = []
    real = reports.save_sample_figure
    monkeypatch.setattr(reports, "save_sample_figure", lambda path, image, heat, title, note=None:
                        titles.append(title) or real(path, image, heat, title, note))
    names = ["basophil", "eosinophil", "platelet"]
    ex = Explained(split="test", indices=np.array([5, 7]), images=np.zeros((2, 28, 28, 3), np.uint8),
                   labels=np.array([0, 1]), predictions=np.array([0, 1]), confidence=np.array([0.97, 0.8]),
                   targets=np.array([2, 1]), maps=np.zeros((2, 28, 28), np.float32), box_mass=None)
    samples, _, _ = write_figures(tmp_path, "gradcam", ex, names)
    assert [s["file"] for s in samples] == ["test_5_gt-basophil_pred-basophil_map-platelet.png",
                                            "test_7_gt-eosinophil_pred-eosinophil.png"]
    assert "map of platelet" in titles[0] and "map of" not in titles[1]
    # review: EigenCAM's and rollout's maps do not depend on the class: they name none
    (tmp_path / "agnostic").mkdir()
    samples, _, _ = write_figures(tmp_path / "agnostic", "rollout", ex, names, class_specific=False)
    assert "_map-" not in samples[0]["file"] and "map of" not in titles[2]


def test_a_sample_given_twice_is_explained_once_and_another_road_seed_is_refused(tiny_run, tmp_path):
    """Review: --indices 5,5,7 explained and scored sample 5 twice (in the ROAD mean and n); a
    new --seed replaced the ROAD scores of the same maps without the refusal other options get."""
    assert explain.parse_indices("5,5,7,5") == [5, 7]
    run = shutil.copytree(tiny_run, tmp_path / "r")
    assert runner.invoke(app, ["explain", str(run), "--indices", "5"]).exit_code == 0
    again = runner.invoke(app, ["explain", str(run), "--indices", "5", "--seed", "1"])
    one_line_error(again, 2, "ROAD scores of seed 0", "ROAD scores of seed 1", "--overwrite")
    assert runner.invoke(app, ["explain", str(run), "--indices", "5", "--seed", "1", "--no-faithfulness",
                               "--overwrite"]).exit_code == 0


def test_multilabel_samples_are_grouped_by_their_labels_alone(tmp_path):
    """Review: aggregate --maps grouped samples by the first run's stored class, which for a
    multi-label sample without findings was the model's most probable label (and maps.npz said
    so): samples are grouped from the data, the first of their labels or "no label"."""
    from medcli import maps, tasks
    from medcli.explain import Explained, save_maps

    task = tasks.MultiLabel(["effusion", "mass", "edema"])
    assert maps._row_class(task.indicator(np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]]))).tolist() == [1, -1, 0]
    assert maps._row_class(tasks.MultiClass(["a", "b", "c"]).indicator(np.array([[2], [0]]))).tolist() == [2, 0]
    ex = Explained(split="test", indices=np.array([4, 7]), images=np.zeros((2, 28, 28, 1), np.uint8),
                   labels=np.array([1, 2]), predictions=np.array([1, 2]), confidence=np.array([0.9, 0.3]),
                   targets=np.array([1, 2]), maps=np.zeros((2, 28, 28), np.float32), box_mass=None,
                   label_sets=np.array([[0, 1, 0], [0, 0, 0]]))
    with np.load(save_maps(tmp_path / "maps.npz", ex, {"flag": "chestmnist", "size": 28}, "--indices 4,7")) as archive:
        assert archive["labels"].tolist() == [1, -1]


def test_constant_maps_are_left_out_of_the_faithfulness_and_counted(tiny_run, tmp_path, monkeypatch):
    """Review: an all-zero Grad-CAM map got a ROAD score (its pixels ranked by the tie-breaking
    noise alone: a random removal) that went into the mean explain, aggregate and the report
    show, with nothing marking it. Such a map has no score; the summary says how many there were."""
    from medcli import explainers

    real = explainers.heatmaps

    def two_constant(*args, **kwargs):
        maps, scores = real(*args, **kwargs)
        maps[:2] = 0.0
        return maps, scores

    monkeypatch.setattr(explainers, "heatmaps", two_constant)
    titles = []
    draw = reports.save_sample_figure
    monkeypatch.setattr(reports, "save_sample_figure", lambda path, image, heat, title, note=None: (
        titles.append(title), draw(path, image, heat, title, note)))
    run = shutil.copytree(tiny_run, tmp_path / "run")
    result = runner.invoke(app, ["explain", str(run), "--per-class", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    index = json.loads(result.stdout)
    flat = [bool(np.ptp(np.load(run / "explain" / "gradcam" / "maps.npz")["maps"][row]) == 0) for row in range(8)]
    assert flat[:2] == [True, True] and [s.get("constant", False) for s in index["samples"]] == flat
    assert all((s["road"] is None) == s.get("constant", False) for s in index["samples"])
    scored = [s["road"] for s in index["samples"] if s["road"] is not None]
    road = index["faithfulness"]
    assert (road["n"], road["constant"]) == (len(scored), 8 - len(scored)) and road["constant"] >= 2
    assert road["mean"] == pytest.approx(np.mean(scored), abs=1e-5)
    assert f"{len(scored)} maps; {8 - len(scored)} constant maps left out" in result.stderr
    assert "ROAD" not in titles[0] and "constant map" in titles[0] and "ROAD" in titles[2]


def test_maps_agreement_counts_only_the_samples_it_is_defined_on(explained_pair, tmp_path, monkeypatch):
    """Review: a sample whose map is constant has no agreement, yet 'monocyte: 0.819 / 0.348
    (n=2)' counted it: n is the samples the mean is over, and the others are said."""
    from medcli import maps

    real = maps.agreement

    def first_undefined(a, b):
        rho, iou = real(a, b)
        rho[0], iou[0] = np.nan, np.nan
        return rho, iou

    monkeypatch.setattr(maps, "agreement", first_undefined)
    a, b = explained_pair
    result = runner.invoke(app, ["aggregate", str(a), str(b), "--maps", "--method", "gradcam", "--out", str(tmp_path),
                                 "--format", "json"])
    assert result.exit_code == 0, result.stderr
    (pair,) = json.loads(result.stdout)["pairs"]
    rows = list(csv.DictReader((tmp_path / "maps_agreement.csv").open()))
    undefined = [row["label"] for row in rows if row["spearman"] == ""]  # sample 0, and any with a constant map
    assert len(rows) == 16 and undefined and (pair["n"], pair["undefined"]) == (16 - len(undefined), len(undefined))
    for name, counts in pair["per_class"].items():
        assert counts["undefined"] == undefined.count(name)
        assert counts["n"] + counts["undefined"] == sum(row["label"] == name for row in rows)
    shown = runner.invoke(app, ["aggregate", str(a), str(b), "--maps", "--method", "gradcam", "--out", str(tmp_path)])
    said = f"over {16 - len(undefined)} of 16 samples ({len(undefined)} with a constant map)"
    name = undefined[0]
    counts = pair["per_class"][name]
    assert said in shown.stdout and f"{name}: " in shown.stdout and \
        f"(n={counts['n']}; {counts['undefined']} undefined)" in shown.stdout, shown.stdout
