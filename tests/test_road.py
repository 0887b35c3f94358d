"""ROAD's imputation (`medcli.road`): the same system and noise as grad-cam's
`NoisyLinearImputer`, solved batched, and tied pixels ranked so that every removal removes its
share of the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import RemoveLeastRelevantFirst, RemoveMostRelevantFirst
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from medcli import road

PERCENTILES = (20, 40, 60, 80)
# grad-cam's np.percentile of a tensor warns under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


def _tie_free_maps(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth hill plus a distinct small step per pixel: no two values (nor 1 - values) tie."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    maps = []
    for _ in range(n):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        hill = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.1 * height * width))
        maps.append(hill + rng.permutation(height * width).reshape(height, width) * 1e-5)
    maps = np.stack(maps).astype(np.float32)
    return maps / maps.max()


@pytest.mark.parametrize("channels,height,width", [(3, 28, 28), (1, 23, 30), (3, 8, 8)])
def test_every_removal_equals_grad_cams_noisy_linear_imputation(channels, height, width):
    """The stencil, the image border, the order of removals and the noise: each perturbed image
    equals grad-cam's, seeded alike, up to the solver's tolerance (a 4-neighbour stencil or
    unseeded noise is off by > 1e-2; the noise itself is 1e-2 x N(0, 1))."""
    x = torch.randn(3, channels, height, width, generator=torch.Generator().manual_seed(1))
    maps = _tie_free_maps(3, height, width)
    ours = torch.cat(list(road.perturbed(x, maps, PERCENTILES, seed=7)))
    torch.manual_seed(7)
    theirs = torch.stack([removal(p, NoisyLinearImputer())(x[i], torch.from_numpy(maps[i]))
                          for removal in (RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
                          for p in PERCENTILES for i in range(3)])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 5e-4
    assert (ours != x.repeat(8, 1, 1, 1)).any(dim=1).float().mean() == pytest.approx(0.5, abs=0.01)  # 80..20 % removed


def test_a_map_with_half_zeros_removes_the_intended_share():
    """grad-cam keeps `map < percentile(map, p)`: nothing at p <= 50 for a map half zeros, and
    removes the whole image. Ties are ranked in a seeded random order instead; values that
    differ keep their order."""
    rng = np.random.default_rng(0)
    values = np.zeros(784, dtype=np.float32)
    values[rng.permutation(784)[:392]] = rng.permutation(392).astype(np.float32) / 392 + 0.01
    cam = values.reshape(1, 28, 28)
    assert (cam < np.percentile(cam, 20)).sum() == 0  # grad-cam's rule: 0 of 784 pixels kept
    kept = road.kept(torch.from_numpy(cam), PERCENTILES, torch.Generator().manual_seed(0))
    counts = kept.sum(dim=(2, 3, 4))
    expected = torch.tensor([int(np.ceil(783 * p / 100)) for p in PERCENTILES])
    assert (counts == expected).all()  # both directions keep p %: 157, 314, 470, 627 pixels
    zero = torch.from_numpy(cam[0] == 0)
    most_first, least_first = kept[1, :, 0], kept[0, :, 0]
    assert (most_first[0] <= zero).all() and (most_first[1] <= zero).all()  # the least relevant kept: zeros
    assert most_first[2].masked_select(~zero).sum() == 470 - 392  # all zeros, then the lowest non-zeros
    assert not least_first[1].masked_select(zero).any()  # the most relevant 314 are all non-zero
    again = road.kept(torch.from_numpy(cam), PERCENTILES, torch.Generator().manual_seed(0))
    other = road.kept(torch.from_numpy(cam), PERCENTILES, torch.Generator().manual_seed(1))
    assert torch.equal(kept, again) and not torch.equal(kept, other)  # seeded, and the seed decides ties
    x = torch.randn(1, 3, 28, 28)
    perturbed = torch.cat(list(road.perturbed(x, cam, PERCENTILES, seed=0)))
    assert (perturbed != x).any(dim=1).sum(dim=(1, 2)).tolist() == [784 - int(n) for n in expected] * 2


def test_chunks_of_removals_change_nothing(monkeypatch):
    """A CPU solves CPU_CHUNK values at a time (a cache-sized share; CHUNK elsewhere): every
    chunk holds at most that many values, and the perturbed images are those of one chunk up
    to the solver's tolerance (the noise and each removal stay with their image)."""
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    maps = _tie_free_maps(3, 28, 28, seed=1)
    whole = list(road.perturbed(x, maps, PERCENTILES, seed=3))
    assert len(whole) == 1
    monkeypatch.setattr(road, "CPU_CHUNK", 5 * 3 * 28 * 28)  # 5 removals of 24 a chunk
    chunks = list(road.perturbed(x, maps, PERCENTILES, seed=3))
    assert [len(chunk) for chunk in chunks] == [5, 5, 5, 5, 4]
    assert (torch.cat(chunks) - whole[0]).abs().max() < 1e-4


def test_images_of_another_float_type_are_imputed_in_that_type():
    """Review: float64 images ended in "masked_scatter: expected self and source to have same
    dtypes" (the noise is drawn in float32)."""
    x = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(4))
    maps = _tie_free_maps(2, 16, 12)
    single = torch.cat(list(road.perturbed(x, maps, PERCENTILES, seed=5)))
    double = torch.cat(list(road.perturbed(x.double(), maps, PERCENTILES, seed=5)))
    assert double.dtype == torch.float64 and (double - single).abs().max() < 1e-4
