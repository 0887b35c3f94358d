"""The model factory: stems, weight transfer, sizes, offline behaviour and run checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from medcli import hub, models
from medcli.errors import UsageError
from medcli.run import Run


def _stem(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)


def _center_response(conv: nn.Conv2d, in_chans: int, size: int) -> torch.Tensor:
    """(in, out): each output channel's response, at the image centre, to a constant image
    that is 1 on one input channel and 0 elsewhere: the sum of each (out, in) kernel."""
    x = torch.eye(in_chans)[:, :, None, None].expand(in_chans, in_chans, size, size)
    with torch.no_grad():
        y = conv(x)
    return y[:, :, y.shape[2] // 2, y.shape[3] // 2]


def _imagenet_like(tmp_path_factory, builder, first_conv: str) -> Path:
    """A torchvision-layout weights file (7x7 RGB first conv, 1000 classes) with non-zero-mean
    first-conv kernels."""
    torch.manual_seed(0)
    state = builder().state_dict()
    state[first_conv] = torch.randn(64, 3, 7, 7) * 0.05 + torch.randn(64, 3, 1, 1) * 0.02
    path = tmp_path_factory.mktemp("weights") / f"{builder.__name__}_imagenet.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def imagenet_like_file(tmp_path_factory) -> Path:
    """A torchvision ResNet-18 file."""
    from torchvision.models import resnet18

    return _imagenet_like(tmp_path_factory, resnet18, "conv1.weight")


@pytest.fixture(scope="module")
def vit_file_224(tmp_path_factory) -> Path:
    """A timm checkpoint (dict with "state_dict") of test_vit at 224 px, 1000 classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_vit_224.pth"
    torch.save({"state_dict": timm.create_model("test_vit", img_size=224).state_dict(), "epoch": 3}, path)
    return path


# -- ResNet stems and weight transfer ----------------------------------------------------------
def test_resnet18_small_stem_keeps_resolution_and_standard_stem_at_128():
    model, spec = models.create("resnet18", 8, 3, 28)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity) and spec["stem"] == "small"
    assert _stem(model)(torch.zeros(1, 3, 28, 28)).shape == (1, 64, 28, 28)

    big, spec = models.create("resnet18", 8, 3, 128)
    assert (big.conv1.kernel_size, big.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(big.maxpool, nn.MaxPool2d) and spec["stem"] == "imagenet"
    assert _stem(big)(torch.zeros(1, 3, 128, 128)).shape == (1, 64, 32, 32)


def test_resnet18_stem_policy_keeps_layer1_between_28_and_56_px_and_old_specs_rebuild_their_own():
    sizes = {}
    for size in (28, 64, 128, 224):
        model, spec = models.create("resnet18", 8, 1, size)
        sizes[size] = (spec["stem"], _stem(model)(torch.zeros(1, 1, size, size)).shape[-1])
    assert sizes == {28: ("small", 28), 64: ("small+pool", 32), 128: ("imagenet", 32), 224: ("imagenet", 56)}
    old = {**spec, "input_size": 64, "stem": "small"}  # a 64-px run trained before the pooled stem
    assert isinstance(models.rebuild(old).maxpool, nn.Identity)
    # a --reduced run from then: "small" with keep_maxpool meant the pooled stem
    old_reduced = {**spec, "input_size": 28, "stem": "small", "overrides": {"keep_maxpool": True}}
    assert isinstance(models.rebuild(old_reduced).maxpool, nn.MaxPool2d)


def test_resnet18_keep_maxpool_override_and_unknown_option():
    model, spec = models.create("resnet18", 8, 3, 28, keep_maxpool=True)
    assert isinstance(model.maxpool, nn.MaxPool2d) and spec["overrides"] == {"keep_maxpool": True}
    assert _stem(model)(torch.zeros(1, 3, 28, 28)).shape == (1, 64, 14, 14)
    with pytest.raises(UsageError, match="does not accept"):
        models.create("resnet18", 8, 3, 28, no_such_option=1)


# -- SmallMapConv2d: the CPU fast path for 2x2 maps ---------------------------------------------
@pytest.mark.parametrize("size,stride,bias", [(2, 1, False), (4, 2, True), (1, 1, False), (3, 2, False)])
def test_small_map_conv_matches_conv2d_forward_and_gradients(size, stride, bias, monkeypatch):
    torch.manual_seed(0)
    reference = nn.Conv2d(16, 24, 3, stride=stride, padding=1, bias=bias).double()
    fast = nn.Conv2d(16, 24, 3, stride=stride, padding=1, bias=bias).double()
    fast.load_state_dict(reference.state_dict())
    models._use_small_map_convs(fast)
    unfolds = []
    unfold = torch.nn.functional.unfold
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: unfolds.append(1) or unfold(*a, **k))
    x = torch.randn(5, 16, size, size, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fast = reference(x_ref), fast(x_fast)
    assert unfolds, "the matrix-product path was taken"
    torch.testing.assert_close(out_fast, out_ref)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out_fast.backward(grad)
    torch.testing.assert_close(x_fast.grad, x_ref.grad)
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad)


def test_resnet18_uses_the_fast_path_only_on_small_maps(monkeypatch):
    """At 28 px with the max-pool kept only layer4 (2x2 maps: four 3x3 convolutions and the
    1x1 shortcut) takes the matrix-product path; without the max-pool (4x4 at layer4) none does."""
    unfolds = []
    unfold = torch.nn.functional.unfold
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: unfolds.append(1) or unfold(*a, **k))
    model, _ = models.create("resnet18", 8, 3, 28, keep_maxpool=True)
    assert isinstance(model.layer4[0].conv1, models.SmallMapConv2d)
    assert set(model.state_dict()) == set(models.create("resnet18", 8, 3, 28, keep_maxpool=True)[0].state_dict())
    model(torch.randn(2, 3, 28, 28))
    assert len(unfolds) == 5
    unfolds.clear()
    models.create("resnet18", 8, 3, 28)[0](torch.randn(2, 3, 28, 28))
    assert unfolds == []


@pytest.mark.parametrize("in_chans", [3, 1])
def test_7x7_to_3x3_transfer_preserves_constant_response(imagenet_like_file, in_chans):
    source = torch.load(imagenet_like_file, weights_only=True)
    reference = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    reference.weight.data = source["conv1.weight"]
    model, spec = models.create("resnet18", 5, in_chans, 28, weights=imagenet_like_file)

    got = _center_response(model.conv1, in_chans, 28)
    want = _center_response(reference, 3, 32)
    if in_chans == 1:  # a grey image is the same value on R, G and B
        want = want.sum(0, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model.conv1.weight.shape == (64, in_chans, 3, 3)
    torch.testing.assert_close(model.layer1[0].conv1.weight, source["layer1.0.conv1.weight"])
    assert model.fc.out_features == 5  # the 1000-class head was dropped
    assert spec["pretrained"] is True and spec["weights"] == str(imagenet_like_file.resolve())


def test_resize_kernel_keeps_zero_mean_edge_filters_bounded():
    edge = torch.tensor([[-1.0, 0, 0, 0, 0, 0, 1.0]]).repeat(7, 1)[None, None]
    small = models.resize_kernel(edge, (3, 3))
    assert small.sum().abs() < 1e-5 and small.abs().max() < 10


# -- DenseNet-121: the second torchvision family, from its record ---------------------------------
def _densenet_stem(model: nn.Module) -> nn.Module:
    f = model.features
    return nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)


@pytest.mark.parametrize("size, stem, kernel, at_block1", [(28, "small", 3, 28), (64, "small+pool", 3, 32),
                                                           (128, "imagenet", 7, 32)])
def test_densenet121_builds_with_the_recorded_stem_and_rebuilds_from_its_spec(size, stem, kernel, at_block1):
    torch.manual_seed(0)
    model, spec = models.create("densenet121", 5, 1, size)
    assert spec["stem"] == stem and spec["family"] == "cnn" and spec["arch"] == "densenet121"
    assert model.features.conv0.kernel_size == (kernel, kernel) and model.features.conv0.in_channels == 1
    assert _densenet_stem(model)(torch.zeros(1, 1, size, size)).shape[-1] == at_block1
    clone = models.rebuild(spec)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, size, size)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name, conv, fan", [("resnet18", "conv1", "out"), ("densenet121", "features.conv0", "in")])
def test_a_replaced_first_conv_is_initialised_as_torchvision_initialises_that_model(name, conv, fan):
    """Review: DenseNet's re-made first conv got ResNet's rule (Kaiming, fan_out): on one channel
    a standard deviation of 0.059 where torchvision's DenseNet init (Kaiming, fan_in) gives 0.47."""
    torch.manual_seed(0)
    weight = models.create(name, 5, 1, 28)[0].get_submodule(conv).weight
    fans = {"in": weight.shape[1] * 9, "out": weight.shape[0] * 9}
    assert weight.std().item() == pytest.approx((2 / fans[fan]) ** 0.5, rel=0.1)


def test_densenet121_keeps_torchvisions_state_dict_keys():
    from torchvision.models import densenet121

    model, _ = models.create("densenet121", 5, 3, 128)
    assert model.state_dict().keys() == densenet121(num_classes=5).state_dict().keys()
    pooled, spec = models.create("densenet121", 5, 3, 28, keep_maxpool=True)  # the --reduced model
    assert spec["stem"] == "small+pool" and isinstance(pooled.features.pool0, nn.MaxPool2d)


@pytest.fixture(scope="module")
def densenet_file(tmp_path_factory) -> Path:
    """A torchvision DenseNet-121 file."""
    from torchvision.models import densenet121

    return _imagenet_like(tmp_path_factory, densenet121, "features.conv0.weight")


@pytest.mark.parametrize("old_keys", [False, True])
def test_densenet121_weights_file_loads_adapted_to_the_small_stem(densenet_file, tmp_path, old_keys):
    """--weights: conv0 resized 7x7 -> 3x3 and summed to one channel (the constant response
    kept), the 1000-class head dropped; files with torchvision's pre-0.4 key names
    ("denselayer1.norm.1", as in its ImageNet file) load through torchvision's own key fix."""
    import re

    source = torch.load(densenet_file, weights_only=True)
    path = densenet_file
    if old_keys:
        path = tmp_path / "densenet121_old.pth"
        old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)", r"\1.\2", key): v  # and no BatchNorm counters
               for key, v in source.items() if not key.endswith("num_batches_tracked")}
        torch.save(old, path)
        assert "features.denseblock1.denselayer1.norm.1.weight" in torch.load(path, weights_only=True)
    model, spec = models.create("densenet121", 5, 1, 28, weights=path)
    reference = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    reference.weight.data = source["features.conv0.weight"]
    torch.testing.assert_close(_center_response(model.features.conv0, 1, 28),
                               _center_response(reference, 3, 32).sum(0, keepdim=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.features.denseblock1.denselayer1.norm1.weight,
                               source["features.denseblock1.denselayer1.norm1.weight"])
    assert model.classifier.out_features == 5 and spec["pretrained"] is True
    torch.save(models.create("resnet18", 5, 3, 28)[0].state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UsageError, match=r"does not fit model densenet121 \(missing keys"):
        models.create("densenet121", 5, 3, 28, weights=tmp_path / "resnet.pth")


def test_every_model_name_has_a_family_record():
    """The record is the one place that knows a family: every alias has one, the torchvision
    ones are exactly the torchvision aliases, and config and explain never branch on a name."""
    import inspect
    import re

    from medcli import config, explain

    for name, (_, library) in models.ALIASES.items():
        record = models.record(name)
        assert record in models.FAMILIES.values() and (record.torchvision is not None) == (library == "torchvision")
        assert set(record.reduced) <= set(record.defaults) | {"input_size", "min_steps"} and record.kind in ("cnn", "vit")
    assert {k for k, r in models.FAMILIES.items() if r.torchvision} == {
        n for n, (_, library) in models.ALIASES.items() if library == "torchvision"}
    assert models.record("timm:test_vit") is models.FAMILIES["vit"] and models.record("timm:test_resnet").rollout is False
    for module in (config, explain):
        source = inspect.getsource(module)
        assert not re.findall(r'"(?:resnet18|densenet121|vit)"|\["family"\]|get\("family"|models\.family\(', source)


def test_the_records_are_light_to_import():
    """`medcli train --help` reads the records: importing models and config loads neither torch nor timm."""
    import subprocess
    import sys

    code = ("import sys, medcli.config, medcli.models; "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'numpy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# -- ViTs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, overrides", [(28, {"patch_size": 4}), (64, {}), (128, {}), (224, {})])
def test_vit_forward_at_any_size(size, overrides):
    model, spec = models.create("timm:test_vit", 5, 3, size, **overrides)
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 5)
    assert spec["family"] == "vit" and spec["overrides"] == overrides


def test_vit_tiny_builds_grayscale_at_28_with_patch_7():
    model, spec = models.create("vit-tiny", 3, 1, 28, patch_size=7)
    assert spec["arch"] == "vit_tiny_patch16_224" and model.patch_embed.proj.in_channels == 1
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 3)


def test_vit_size_not_divisible_by_patch_names_an_option_that_exists():
    """Review: the message advised a `patch_size` no command-line option sets."""
    with pytest.raises(UsageError, match=r"not divisible by its patch size 16; pass an --input-size divisible by 16 "
                                         r"\(e.g. 32\)"):
        models.create("timm:test_vit", 5, 3, 28)


def test_names_and_families():
    assert [models.record(n).kind for n in ("resnet18", "densenet121", "vit", "timm:test_vit", "timm:resnet10t")] == [
        "cnn", "cnn", "vit", "vit", "cnn"]
    with pytest.raises(UsageError, match="choose resnet18, densenet121, vit, vit-small, vit-tiny or timm:<name>"):
        models.create("resnet50", 2, 3, 28)
    with pytest.raises(UsageError, match=r"timm has no model 'nope_net'.*list_models"):
        models.create("timm:nope_net", 2, 3, 28)


def test_pretrained_stats_come_from_the_weights_own_config():
    """Review defect 5: timm ViT weights expect 0.5/0.5, torchvision's ResNet-18 ImageNet's;
    a model trained from scratch uses medcli's own statistics (None here)."""
    from timm.data import IMAGENET_DEFAULT_MEAN

    vit, spec = models.create("timm:vit_tiny_patch16_224", 3, 3, 32)
    assert models.pretrained_stats(vit, spec) is None
    assert models.pretrained_stats(vit, {**spec, "pretrained": True}) == ((0.5,) * 3, (0.5,) * 3)
    resnet, spec = models.create("resnet18", 3, 3, 28)
    assert models.pretrained_stats(resnet, {**spec, "pretrained": True})[0] == IMAGENET_DEFAULT_MEAN


def test_make_deterministic_swaps_global_pooling_for_an_exact_mean():
    """Review defect 2: AdaptiveAvgPool2d has no deterministic CUDA backward. The replacement
    computes the same outputs and gradients and loads the same checkpoints."""
    torch.manual_seed(0)
    for name in ("resnet18", "densenet121", "timm:test_resnet"):
        model, _ = models.create(name, 3, 3, 28)
        model.eval()
        plain = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(2, 3, 28, 28, requires_grad=True)
        expected = model(x)
        (grad,) = torch.autograd.grad(expected.sum(), x)
        replaced = models.make_deterministic(model)
        assert replaced and not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
        out = model(x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], grad)
        assert model.state_dict().keys() == plain.keys()


# -- pretrained weights without a network ------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "densenet121", "timm:test_vit"])
def test_pretrained_offline_warns_once_and_trains_from_scratch(offline, capsys, name):
    model, spec = models.create(name, 4, 3, 16, pretrained=True)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "could not fetch pretrained weights" in err and "--weights" in err
    assert spec["pretrained"] is False and spec["weights"] is None
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 4)


def test_pretrained_online_really_downloads(monkeypatch, capsys, tmp_path):
    """With the network up, resnet18 asks torch hub and timm asks the Hugging Face hub (online)."""
    from huggingface_hub import constants

    asked = []

    def refuse(source, *args, **kwargs):
        asked.append((str(source), constants.HF_HUB_OFFLINE))
        raise ConnectionError("test refuses downloads")

    monkeypatch.setattr(hub, "unreachable", lambda url: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", refuse)
    models.create("resnet18", 4, 3, 32, pretrained=True)
    models.create("timm:test_vit", 4, 3, 32, pretrained=True)
    models.create("densenet121", 4, 3, 32, pretrained=True)
    assert asked[0][0].startswith("https://download.pytorch.org/models/resnet18")
    assert asked[1] == ("timm/test_vit.r160_in1k", False)
    assert asked[2][0].startswith("https://download.pytorch.org/models/densenet121")
    assert capsys.readouterr().err.count("test refuses downloads") == 3


def test_unreachable_honours_hf_hub_offline_and_failed_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.unreachable("https://huggingface.co") == "HF_HUB_OFFLINE is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_route(address, timeout):
        assert timeout <= 5
        raise OSError("no route")

    monkeypatch.setattr(hub.socket, "create_connection", no_route)
    assert "cannot reach huggingface.co" in hub.unreachable("https://huggingface.co")


# -- weights files -----------------------------------------------------------------------------
@pytest.mark.parametrize("in_chans", [3, 1])
def test_timm_weights_at_224_load_at_64_with_resampled_pos_embed(vit_file_224, in_chans):
    source = torch.load(vit_file_224, weights_only=True)["state_dict"]
    model, spec = models.create("timm:test_vit", 5, in_chans, 64, weights=vit_file_224)
    assert source["pos_embed"].shape[1] == 1 + 14 * 14 and model.pos_embed.shape[1] == 1 + 4 * 4
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"])
    patch = source["patch_embed.proj.weight"]
    torch.testing.assert_close(model.patch_embed.proj.weight, patch if in_chans == 3 else patch.sum(1, keepdim=True))
    assert model(torch.zeros(1, in_chans, 64, 64)).shape == (1, 5) and spec["pretrained"] is True


def test_weights_of_another_architecture_are_refused(imagenet_like_file, vit_file_224):
    with pytest.raises(UsageError, match=r"does not fit model resnet18 \(missing keys"):
        models.create("resnet18", 5, 3, 28, weights=vit_file_224)
    with pytest.raises(UsageError, match=r"does not fit model timm:test_vit \(missing keys"):
        models.create("timm:test_vit", 5, 3, 64, weights=imagenet_like_file)
    with pytest.raises(UsageError, match=r"does not fit model timm:test_vit \(.*size mismatch"):
        models.create("timm:test_vit", 5, 3, 64, embed_dim=32, weights=vit_file_224)  # same keys, other widths


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_unreadable_weights_files_are_usage_errors(imagenet_like_file, tmp_path, damage):
    path = tmp_path / "weights.pth"
    if damage == "truncated":
        path.write_bytes(imagenet_like_file.read_bytes()[:5000])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file at all")
    with pytest.raises(UsageError) as info:
        models.create("resnet18", 5, 3, 28, weights=path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# -- rebuild and run checkpoints -----------------------------------------------------------------
@pytest.mark.parametrize("name, size, overrides", [("resnet18", 8, {}), ("timm:test_vit", 28, {"patch_size": 7})])
def test_rebuild_round_trip_gives_identical_outputs(name, size, overrides):
    model, spec = models.create(name, 3, 1, size, **overrides)
    clone = models.rebuild(spec)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, size, size)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x), rtol=0, atol=0)


def _run(tmp_path: Path, spec: dict, state: dict | None = None, which: str = "best") -> Run:
    run = Run.create(tmp_path, "run", config={}, dataset={}, model=spec)
    if state is not None:
        (tmp_path / "run" / "checkpoints").mkdir()
        torch.save({"model": state, "epoch": 1}, tmp_path / "run" / "checkpoints" / f"{which}.pt")
    return run


def test_run_load_model_restores_the_trained_model(tmp_path):
    model, spec = models.create("resnet18", 3, 3, 8)
    manifest = _run(tmp_path, spec, model.state_dict())
    loaded = Run.open(manifest.run_dir).load_model()
    assert not loaded.training
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_run_load_model_errors(tmp_path):
    model, spec = models.create("resnet18", 3, 3, 28)
    manifest = _run(tmp_path, spec, model.state_dict())
    # review: the run is trained; the other checkpoint is named when it is there
    with pytest.raises(UsageError, match=r"has no checkpoints/last.pt; use --checkpoint best, or restore the file"):
        manifest.load_model(checkpoint="last")

    best = manifest.path("checkpoints/best.pt")
    best.write_bytes(best.read_bytes()[:4096])
    with pytest.raises(UsageError, match=r"is damaged .*; re-train or use --checkpoint last"):
        manifest.load_model()

    torch.save({"model": timm.create_model("test_vit", num_classes=3).state_dict()}, best)
    with pytest.raises(UsageError, match=r"checkpoints/best.pt does not fit model resnet18 \(missing keys"):
        manifest.load_model()



def test_the_reachability_probe_follows_no_proxy_and_the_urls_scheme(monkeypatch):
    """Review: the probe always tried the https proxy, so a local mirror in NO_PROXY (or an
    http URL) was judged offline."""
    asked = []
    monkeypatch.setattr(hub.socket, "create_connection", lambda address, timeout: asked.append(address) or _Closed())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert hub.unreachable("http://127.0.0.1:8765/x") is None and asked[-1] == ("127.0.0.1", 8765)
    assert hub.unreachable("https://huggingface.co/x") is None and asked[-1] == ("proxy.invalid", 3128)
    monkeypatch.setenv("HTTP_PROXY", "http://other.invalid:8080")
    monkeypatch.setenv("NO_PROXY", "")
    assert hub.unreachable("http://mirror.lan/x") is None and asked[-1] == ("other.invalid", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "bare.invalid:3128")  # no scheme, as requests accepts it
    assert hub.unreachable("https://huggingface.co/x") is None and asked[-1] == ("bare.invalid", 3128)
    for name in ("HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("ALL_PROXY", "http://all.invalid:1080")
    assert hub.unreachable("https://huggingface.co/x") is None and asked[-1] == ("all.invalid", 1080)


class _Closed:
    def close(self):
        pass


def test_timm_models_of_a_fixed_size_are_built_for_the_input_size_or_refused_up_front():
    """Review: timm models outside the ViT record that take their size at construction
    (MaxViT, relative-position ViTs) were built at their default size and failed in the
    first step ("unexpected AssertionError"), after the run directory existed."""
    model, spec = models.create("timm:test_vit_relpos", 8, 3, 32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(UsageError, match="timm:test_maxvit does not take 28-px inputs"):
        models.create("timm:test_maxvit", 8, 3, 28)
    with pytest.raises(UsageError, match="pass an --input-size divisible by 16"):
        models.create("timm:test_vit", 8, 3, 30)


def test_weights_from_a_medcli_run_keep_that_runs_normalisation(tmp_path):
    """Review: any --weights file switched the normalisation to ImageNet's, though a medcli
    run's checkpoint was trained with its own statistics (0.5/0.5 from scratch): the run's
    recorded preprocessing wins; a foreign file's are those its weights were made with."""
    model, _ = models.create("timm:test_resnet", 8, 3, 28)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    model, spec = models.create("timm:test_resnet", 8, 3, 28, weights=tmp_path / "best.pt")
    recorded = {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2], "interpolation": "bilinear"}
    assert models.pretrained_stats(model, spec, recorded) == ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    timm_stats = (tuple(timm.data.resolve_model_data_config(model)["mean"]),
                  tuple(timm.data.resolve_model_data_config(model)["std"]))
    assert models.pretrained_stats(model, spec) == timm_stats
    assert models.pretrained_stats(model, spec, {"mean": None}) == timm_stats  # a damaged manifest's


def test_a_torchvision_head_of_another_width_is_refused_not_dropped(tmp_path):
    """Review: a resnet18 file whose classifier takes 7 features (another architecture's)
    loaded with its head dropped silently; timm models refuse such a file. A head for
    another class count is still dropped (ImageNet's 1,000 classes)."""
    model, _ = models.create("resnet18", 8, 3, 28)
    state = model.state_dict()
    state["fc.weight"] = torch.zeros(8, 7)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(UsageError, match="does not fit model resnet18"):
        models.create("resnet18", 8, 3, 28, weights=tmp_path / "odd.pt")
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "imagenet.pt")
    assert models.create("resnet18", 8, 3, 28, weights=tmp_path / "imagenet.pt")[1]["pretrained"] is True


def test_a_timm_model_built_for_its_size_records_it_and_older_specs_rebuild_as_before():
    """Review of the fix: `rebuild` passed img_size to every timm model that takes one, so a
    run trained before (built at the model's default size) no longer fit its checkpoint. The
    size is recorded in the spec when `create` uses it, and only then passed again; a CNN is
    built (and initialised) as before."""
    torch.manual_seed(0)
    model, spec = models.create("timm:test_vit_relpos", 8, 3, 32)
    assert spec["overrides"]["img_size"] == 32
    again = models.rebuild(spec)
    again.load_state_dict(model.state_dict())
    assert tuple(again.patch_embed.img_size) == (32, 32)
    old = {**spec, "overrides": {}}  # a spec from before: the default size
    default = timm.create_model("test_vit_relpos", num_classes=8)
    assert tuple(models.rebuild(old).patch_embed.img_size) == tuple(default.patch_embed.img_size) != (32, 32)
    torch.manual_seed(0)
    cnn, cnn_spec = models.create("timm:test_resnet", 8, 3, 28)
    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=8, in_chans=3)
    assert "img_size" not in cnn_spec["overrides"]
    assert all(torch.equal(a, b) for a, b in zip(cnn.state_dict().values(), plain.state_dict().values()))
