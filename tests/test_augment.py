"""Preprocessing and batched augmentation: exact geometry, seeded randomness, real MixUp."""

from __future__ import annotations

import pytest
import torch

from medcli import augment

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # a pretrained model's (mean, std)
NONE = augment.Augment(hflip=False, vflip=False, rot90=False, brightness=0.0, contrast=0.0)


def _batch(n=16, c=3, size=28, seed=0):
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mixup(x, targets, alpha, generator):
    """x and soft `targets` blended with a shuffled copy of the batch by `draw_mixup`'s weight,
    the way training mixes (`test_training_mixes_images_and_targets_by_the_same_weight_and_partners`).
    Returns (x, targets, lam, perm), perm on x's device."""
    lam, perm = augment.draw_mixup(x.shape[0], alpha, generator)
    perm = perm.to(x.device, non_blocking=True)
    return torch.lerp(x[perm], x, lam), torch.lerp(targets[perm], targets, lam), lam, perm


def test_preprocess_scales_normalises_and_resizes():
    prep = augment.make_prep(28, 3)
    x = torch.zeros(2, 3, 28, 28, dtype=torch.uint8)
    x[1] = 255
    out = augment.preprocess(x, prep)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 28, 28)
    assert torch.allclose(out[0], torch.full_like(out[0], -1.0)) and torch.allclose(out[1], torch.ones_like(out[1]))
    for size in (14, 64):
        resized = augment.preprocess(_batch(2), augment.make_prep(size, 3))
        assert resized.shape == (2, 3, size, size)
    # normalise-then-resize equals resize-then-normalise (bilinear weights sum to one)
    x = _batch(2)
    prep64 = augment.make_prep(64, 3, IMAGENET)
    reference = torch.nn.functional.interpolate(x.float() / 255, size=(64, 64), mode="bilinear", align_corners=False)
    mean = torch.tensor(prep64["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(prep64["std"]).view(1, 3, 1, 1)
    assert torch.allclose(augment.preprocess(x, prep64), (reference - mean) / std, atol=1e-5)


def test_no_augmentation_equals_preprocess():
    x = _batch()
    prep = augment.make_prep(28, 3)
    out = augment.apply(x, prep, NONE, augment.draw(x.shape[0], NONE, _gen()))
    assert torch.allclose(out, augment.preprocess(x, prep), atol=1e-5)


@pytest.mark.parametrize("kind", ["hflip", "vflip", "rot90"])
def test_flips_and_quarter_turns_are_exact_and_cover_all_cases(kind):
    x = _batch(64)
    prep = augment.make_prep(28, 3)
    ref = augment.preprocess(x, prep)
    aug = augment.Augment(**{**NONE.to_dict(), kind: True})
    out = augment.apply(x, prep, aug, augment.draw(x.shape[0], aug, _gen(1)))
    candidates = {
        "hflip": [lambda t: t, lambda t: t.flip(-1)],
        "vflip": [lambda t: t, lambda t: t.flip(-2)],
        "rot90": [lambda t, k=k: t.rot90(k, (-2, -1)) for k in range(4)],
    }[kind]
    used = set()
    for i in range(x.shape[0]):
        errors = [(out[i] - f(ref[i])).abs().max().item() for f in candidates]
        best = min(range(len(errors)), key=errors.__getitem__)
        assert errors[best] < 1e-4, f"sample {i} is not an exact {kind} of its input"
        used.add(best)
    assert used == set(range(len(candidates)))  # every variant drawn in 64 samples


def test_augmentation_is_seeded_and_varies_per_sample():
    x = _batch()
    prep = augment.make_prep(32, 3)
    aug = augment.Augment(degrees=15, crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2)
    a = augment.apply(x, prep, aug, augment.draw(x.shape[0], aug, _gen(3)))
    b = augment.apply(x, prep, aug, augment.draw(x.shape[0], aug, _gen(3)))
    c = augment.apply(x, prep, aug, augment.draw(x.shape[0], aug, _gen(4)))
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    same = x[:1].expand(8, -1, -1, -1).contiguous()  # one image, eight different draws
    outs = augment.apply(same, prep, aug, augment.draw(same.shape[0], aug, _gen(5)))
    assert len({tuple(o.flatten()[:50].tolist()) for o in outs}) == 8
    assert torch.isfinite(a).all() and a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5


def test_grayscale_batches():
    x = _batch(4, c=1)
    prep = augment.make_prep(64, 1, IMAGENET)
    aug = augment.Augment(degrees=10)
    out = augment.apply(x, prep, aug, augment.draw(x.shape[0], aug, _gen()))
    assert out.shape == (4, 1, 64, 64) and len(prep["mean"]) == 1


def test_draw_mixup_is_a_seeded_beta_weight_and_a_shuffle():
    """lam ~ Beta(alpha, alpha) (mean 1/2, variance 1 / (4 (2 alpha + 1))), perm a permutation,
    both the same again from the same seed."""
    lam, perm = augment.draw_mixup(32, 0.4, _gen(7))
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(32)) and not torch.equal(perm, torch.arange(32))
    again = augment.draw_mixup(32, 0.4, _gen(7))
    assert again[0] == lam and torch.equal(again[1], perm)
    lams = torch.tensor([augment.draw_mixup(2, 0.4, _gen(seed))[0] for seed in range(4000)], dtype=torch.float64)
    assert abs(lams.mean().item() - 0.5) < 0.02 and abs(lams.var().item() - 1 / (4 * 1.8)) < 0.01


def test_draw_epoch_draws_what_a_draw_per_step_would():
    """The epoch's draws made up front (what training uses) are the numbers of `draw` and
    `draw_mixup` called step by step on the same generator: the stream a resume, another
    world size and the per-step API all agree on."""
    aug = augment.for_dataset("bloodmnist", rotate=10.0, crop_scale=0.6, jitter=0.2)
    epoch = augment.draw_epoch(3, 8, aug, 0.4, _gen(5))
    generator = _gen(5)
    for step in range(3):
        params = augment.draw(8, aug, generator)
        lam, perm = augment.draw_mixup(8, 0.4, generator)
        assert params.keys() == epoch.params.keys() and len(params) == 3
        assert all(torch.equal(params[key], epoch.params[key][step]) for key in params)
        assert lam == epoch.lams[step] and torch.equal(perm, epoch.perms[step])
    without = augment.draw_epoch(2, 8, aug, 0.0, _gen(5))
    assert without.lams == [] and without.perms is None
    generator = _gen(5)
    second = [augment.draw(8, aug, generator) for _ in range(2)][1]  # no MixUp draws in between
    assert torch.equal(without.params["theta"][1], second["theta"])


def test_training_mixes_images_and_targets_by_the_same_weight_and_partners():
    """Review: the MixUp test checked a helper of its own, not training's mixing. Here a real
    epoch (2 steps of 16): the model sees lam x + (1 - lam) x[perm] of the augmented batch,
    and the loss gets the one-hot targets mixed the same way (not with 1 - lam)."""
    from medcli import tasks

    from cli_helpers import run_epoch, tiny_epoch

    seen = {"x": [], "targets": [], "labels": []}

    class Spying(tasks.MultiClass):
        def loss(self, logits, targets, label_smoothing=0.0):
            seen["targets"].append(targets)
            return super().loss(logits, targets, label_smoothing)

        def hits(self, logits, labels):
            seen["labels"].append(labels)
            return super().hits(logits, labels)

    state, data, prep, config = tiny_epoch(32, task=Spying([str(k) for k in range(8)]), mixup_alpha=0.4)
    model = state.model
    state.forward = lambda x: seen["x"].append(x.clone()) or model(x)
    drawn, augmented = [], []
    with pytest.MonkeyPatch.context() as patch:
        real_draw, real_apply = augment.draw_epoch, augment.apply
        patch.setattr(augment, "draw_epoch", lambda *a: drawn.append(real_draw(*a)) or drawn[-1])
        patch.setattr(augment, "apply", lambda *a: augmented.append(real_apply(*a)) or augmented[-1])
        run_epoch(state, data, prep, config)
    [draws] = drawn
    assert len(augmented) == len(seen["x"]) == 2
    for step, x in enumerate(augmented):
        lam, perm = draws.lams[step], draws.perms[step]
        assert 0.0 < lam < 1.0 and lam != 0.5
        torch.testing.assert_close(seen["x"][step], lam * x + (1 - lam) * x[perm])
        one_hot = torch.nn.functional.one_hot(seen["labels"][step], 8).float()
        torch.testing.assert_close(seen["targets"][step], lam * one_hot + (1 - lam) * one_hot[perm])


def test_dataset_aware_defaults_and_options():
    cells = augment.for_dataset("bloodmnist")
    assert (cells.hflip, cells.vflip, cells.rot90) == (True, True, True)
    for oriented in ("organamnist", "chestmnist", "pneumoniamnist"):  # left/right organs, anatomical up
        aug = augment.for_dataset(oriented)
        assert not (aug.hflip or aug.vflip or aug.rot90)
    assert not augment.for_dataset("organamnist").geometric
    assert augment.for_dataset("chestmnist").degrees == 10.0  # small rotations only
    assert augment.for_dataset("organamnist", flips=True).rot90
    assert not augment.for_dataset("bloodmnist", flips=False).geometric
    aug = augment.for_dataset("bloodmnist", rotate=15, crop_scale=0.5, jitter=0.3)
    assert (aug.degrees, aug.crop_scale, aug.brightness, aug.contrast) == (15.0, (0.5, 1.0), 0.3, 0.3)
    assert augment.for_dataset("bloodmnist", crop_scale=1.0).crop_scale is None


@pytest.mark.parametrize("option, value", [("rotate", -1.0), ("rotate", 181.0), ("crop_scale", 0.0),
                                           ("crop_scale", 1.5), ("jitter", 1.0), ("jitter", -0.1)])
def test_out_of_range_augmentation_options_are_usage_errors(option, value):
    from medcli.errors import UsageError

    with pytest.raises(UsageError, match=f"--{option.replace('_', '-')}"):
        augment.for_dataset("bloodmnist", **{option: value})


def test_crop_scale_really_zooms_in():
    """A crop keeping 25% of the area magnifies twice: a centred square covering 25% of the
    image covers more of each output (56% on average over crop positions, never less than 25%)."""
    x = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 7:21, 7:21] = 255  # centred 14x14 square, 25% of the area
    prep = augment.make_prep(28, 1)
    zoom = augment.Augment(hflip=False, vflip=False, rot90=False, crop_scale=(0.25, 0.25), brightness=0.0, contrast=0.0)
    plain = augment.apply(x, prep, NONE, augment.draw(x.shape[0], NONE, _gen()))
    zoomed = augment.apply(x, prep, zoom, augment.draw(x.shape[0], zoom, _gen()))
    bright = lambda batch: (batch > 0).float().mean().item()  # noqa: E731 - share of bright pixels
    assert bright(plain) == pytest.approx(0.25, abs=0.02)
    assert bright(zoomed) > 0.25 + 0.1  # the square covers more of every output


@pytest.mark.parametrize("source, size", [(64, 28), (28, 56)])
def test_training_resizes_exactly_like_evaluation(source, size):
    """The model must see in training what it sees in evaluation. Downscaling (64 -> 28 px)
    goes through preprocess's antialiased resize before the geometric transform; upscaling
    (28 -> 56 px) keeps one grid_sample, which agrees with bilinear interpolation. With flips
    only, every training sample is therefore preprocess's output or its mirror image."""
    x = _batch(32, size=source)
    prep = augment.make_prep(size, 3)
    ref = augment.preprocess(x, prep)
    plain = augment.apply(x, prep, NONE, augment.draw(x.shape[0], NONE, _gen()))
    assert torch.allclose(plain, ref, atol=1e-4)  # no geometry
    flips = augment.Augment(**{**NONE.to_dict(), "hflip": True})
    out = augment.apply(x, prep, flips, augment.draw(x.shape[0], flips, _gen(2)))
    assert out.shape == ref.shape
    mirrored = 0
    for i in range(x.shape[0]):
        if not torch.allclose(out[i], ref[i], atol=1e-4):
            error = (out[i] - ref[i].flip(-1)).abs().max().item()
            assert error < 1e-4, f"sample {i} ({source} -> {size} px) is neither preprocess's output nor its mirror (off by {error:.3g})"
            mirrored += 1
    assert 0 < mirrored < x.shape[0]  # both cases drawn


def _strict_samplers(monkeypatch) -> list:
    """Make torch's seeded samplers as strict on every device as they are on CUDA (a generator
    only draws on its own device type) and log every tensor drawn from a generator."""
    drawn = []
    for name in ("rand", "randint", "randperm"):
        def sampler(*args, _real=getattr(torch, name), **kwargs):
            generator = kwargs.get("generator")
            if generator is not None:
                device = torch.device(kwargs.get("device") or "cpu")
                if device.type != generator.device.type:
                    raise RuntimeError(f"Expected a '{device.type}' device type for generator but found '{generator.device.type}'")
            out = _real(*args, **kwargs)
            if generator is not None:
                drawn.append(out.clone())
            return out
        monkeypatch.setattr(torch, name, sampler)
    return drawn


def test_random_stream_is_drawn_on_the_cpu_whatever_the_batch_device(monkeypatch):
    """Every draw comes from the CPU generator and only the small results move to the batch's
    device, so a run resumes on another device type with the same stream and generator state.

    On CUDA a CPU generator cannot draw into a CUDA tensor (RuntimeError). Without a GPU, a
    'meta' batch stands in for the accelerator's, and the samplers are made as strict as
    CUDA's: drawing on the batch's device fails, drawing on the CPU gives the same numbers
    and leaves the generator in the same state as a CPU batch does."""
    x = _batch(8, size=64)
    targets = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float()
    prep = augment.make_prep(28, 3)
    aug = augment.Augment(degrees=15, crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2)
    drawn = _strict_samplers(monkeypatch)
    runs = {}
    for device in ("cpu", "meta"):
        generator = _gen(3)
        drawn.clear()
        out = augment.apply(x.to(device), prep, aug, augment.draw(x.shape[0], aug, generator))
        mixed_x, mixed_t, lam, perm = _mixup(out, targets.to(device), 0.4, generator)
        assert out.shape == (8, 3, 28, 28) and {t.device.type for t in (out, mixed_x, mixed_t, perm)} == {device}
        runs[device] = (list(drawn), lam, generator.get_state())
    (cpu_draws, cpu_lam, cpu_state), (meta_draws, meta_lam, meta_state) = runs["cpu"], runs["meta"]
    assert len(cpu_draws) == len(meta_draws) > 0 and all(map(torch.equal, cpu_draws, meta_draws))
    assert cpu_lam == meta_lam and torch.equal(cpu_state, meta_state)


def test_non_cpu_generators_are_refused():
    class Accelerator:  # stands in for torch.Generator(device="cuda") on a machine without one
        device = torch.device("cuda")

    x, aug = _batch(2), augment.Augment()
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        augment.apply(x, augment.make_prep(28, 3), aug, augment.draw(x.shape[0], aug, Accelerator()))
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        _mixup(torch.zeros(2, 3, 4, 4), torch.zeros(2, 2), 0.4, Accelerator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_follow_the_cpu_stream():
    x = _batch(16, size=64)
    targets = torch.nn.functional.one_hot(torch.arange(16) % 4, 4).float()
    prep = augment.make_prep(28, 3)
    aug = augment.Augment(degrees=15, crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2)
    cpu_gen, cuda_gen = _gen(3), _gen(3)
    cpu = augment.apply(x, prep, aug, augment.draw(x.shape[0], aug, cpu_gen))
    cuda = augment.apply(x.cuda(), prep, aug, augment.draw(x.shape[0], aug, cuda_gen))
    assert cuda.is_cuda and torch.allclose(cuda.cpu(), cpu, atol=1e-3)
    _, _, cpu_lam, cpu_perm = _mixup(cpu, targets, 0.4, cpu_gen)
    _, _, cuda_lam, cuda_perm = _mixup(cuda, targets.cuda(), 0.4, cuda_gen)
    assert cuda_lam == cpu_lam and torch.equal(cuda_perm.cpu(), cpu_perm)
    assert torch.equal(cuda_gen.get_state(), cpu_gen.get_state())
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        augment.apply(x.cuda(), prep, aug, augment.draw(x.shape[0], aug, torch.Generator(device="cuda")))


@pytest.mark.parametrize("flag, axes", [
    ("breastmnist", (True, False, False)),  # a mirror is the same anatomy; the skin stays at the top
    ("octmnist", (True, False, False)),  # the vitreous stays above the retina's layers
    ("pneumoniamnist", (False, False, False)),  # the heart stays on the left
    ("organcmnist", (False, False, False)),  # left and right organs are different classes
    ("retinamnist", (True, True, True)),  # fundus photographs have no up
    ("dermamnist", (True, True, True)),
])
def test_flips_are_chosen_per_axis_from_the_modality_table(flag, axes):
    aug = augment.for_dataset(flag)
    assert (aug.hflip, aug.vflip, aug.rot90) == axes
    assert augment.MODALITIES[flag].why in augment.source(flag)
    on, off = augment.for_dataset(flag, flips=True), augment.for_dataset(flag, flips=False)  # an explicit choice wins
    assert (on.hflip, on.vflip, on.rot90) == (True, True, True) and not (off.hflip or off.vflip or off.rot90)
    assert augment.for_dataset(flag, rotate=0.0).degrees == 0.0 and "--rotate" in augment.source(flag, rotate=0.0)


def test_every_medmnist_2d_dataset_has_a_row_with_a_reason():
    from medcli import datasets

    assert set(datasets.flags()) <= set(augment.MODALITIES)
    assert all(axes.why for axes in augment.MODALITIES.values())
    assert augment.ORIENTED == {"breastmnist", "octmnist", "pneumoniamnist", "chestmnist", "organamnist",
                                "organcmnist", "organsmnist"}


def test_a_small_training_set_gets_a_mild_crop_unless_crop_scale_is_given():
    from medcli.config import SMALL_TRAIN, fit_augment_to_data, resolve_config

    config = resolve_config(dataset="breastmnist", device="cpu")
    small = fit_augment_to_data(config, 546)
    assert small["augment"]["crop_scale"] == (0.8, 1.0) and "546 training images" in small["augment_source"]
    assert small["augment"]["hflip"] and not small["augment"]["vflip"] and small["augment"]["degrees"] == 10.0
    assert fit_augment_to_data(config, SMALL_TRAIN) is config  # large enough: no crop
    given = resolve_config(dataset="breastmnist", device="cpu", crop_scale=1.0)
    assert fit_augment_to_data(given, 546) is given and given["augment"]["crop_scale"] is None
