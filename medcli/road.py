"""ROAD's noisy linear imputation (Rong et al., "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", ICML 2022), batched on the device the images are on.

grad-cam's `NoisyLinearImputer` builds, for every map and percentile, a scipy sparse system
(each removed pixel is the weighted mean of its in-image 8 neighbours, weights 1/6 for the
4 edge and 1/12 for the 4 corner neighbours, known pixels fixed) and solves it with `spsolve`
on the CPU, one system per map, percentile and direction: seconds per 224-px map. `impute`
solves the same systems, all at once: conjugate gradient with the stencil as array shifts,
preconditioned by one geometric multigrid V-cycle (Galerkin coarse operators, which follow
removed regions of any shape; Jacobi smoothing; a dense solve on the coarsest grid), to a
relative residual of TOLERANCE: imputed values within ~2e-4 of `spsolve`'s at 28 px, ~1e-3 at
64 px and up to ~3e-3 at 224 px with almost every pixel removed (the larger systems are worse
conditioned), where the noise grad-cam adds is 1e-2.
`perturbed` draws grad-cam's noise (0.01 x N(0, 1) per imputed value) from the same CPU
stream in the same order, so a seeded score equals grad-cam's up to the solver's tolerance.

Which pixels stay (`kept`): at percentile p the pixels of rank below ceil((n - 1) p / 100)
(grad-cam's `mask < np.percentile(mask, p)`, on a map without ties), the least relevant for
"most relevant first" and the most relevant for "least relevant first": 100 - p % of the image
is removed. grad-cam's rule keeps nothing when more than p % of a map ties at its lowest
value (a ReLU'd Grad-CAM map is often zero over most of the image) and removes the whole
image. Rong et al. rank after adding tiny seeded noise; here ties are broken in a seeded random
order, the limit of that noise, which leaves distinct values in their order.

torch is imported inside functions.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

__all__ = ["CHUNK", "CPU_CHUNK", "NOISE", "impute", "kept", "perturbed"]

NOISE = 0.01  # grad-cam's NoisyLinearImputer(noise=0.01)
EDGE, CORNER = 1 / 6, 1 / 12  # grad-cam's neighbour weights (they sum to 1)
OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # 3x3 stencil order; index 4 is the centre
COARSEST = 8  # grids at most this many cells a side are solved directly
TOLERANCE = 1e-4  # relative residual where conjugate gradient stops: values within 2e-4 to 3e-3 (28 to 224 px) of spsolve's
MAX_ITERATIONS = 100
CHUNK = 2**22  # image values imputed at once on a GPU (16 MiB per float32 vector; the solver keeps about a dozen)
CPU_CHUNK = 2**20  # on a CPU: 4 MiB vectors keep more of the solver's data in cache (10-18 % faster at 224 px)


def perturbed(x, maps, percentiles: Sequence[float], seed: int, samples: Sequence[int] | None = None) -> Iterator:
    """The images x (N, C, H, W) after every removal ROAD makes with `maps` (N, H, W), in
    grad-cam's order: "least relevant first" then "most relevant first", each percentile, each
    image (row r is from image r % N). Yields them in chunks of at most CHUNK values (CPU_CHUNK
    on a CPU), on x's device. The noise and the order of tied pixels come from CPU generators:
    without `samples` one seeded with `seed`, whose noise is the stream grad-cam draws after
    torch.manual_seed(seed) (the oracle's); with `samples` (an id per image, e.g. its index in
    the split) one per image seeded with (seed, id), so an image's score depends on neither the
    batch it is in nor the other images explained."""
    import torch

    n, channels, height, width = x.shape
    generator = (torch.Generator().manual_seed(seed) if samples is None else
                 [torch.Generator().manual_seed(_sample_seed(seed, sample)) for sample in samples])
    noise = _removal_noise(height * width, channels, percentiles, n, generator)
    removed = ~kept(torch.as_tensor(maps, device=x.device), percentiles, generator).flatten(0, 2)
    source = torch.arange(len(removed), device=x.device) % n
    step = max(1, (CPU_CHUNK if x.device.type == "cpu" else CHUNK) // (channels * height * width))
    for start in range(0, len(removed), step):
        rows = slice(start, start + step)
        yield impute(x[source[rows]], removed[rows], noise[rows])


def _sample_seed(seed: int, sample: int) -> int:
    """A well-mixed seed for one sample's generator (numpy's SeedSequence of the pair)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(sample)]).generate_state(1, np.uint64)[0] >> 1)


def kept(maps, percentiles: Sequence[float], generator):
    """Which pixels each removal keeps: bool (2, P, N, H, W) for maps (N, H, W); [0] "least
    relevant first" keeps the most relevant, [1] "most relevant first" the least relevant, p %
    of the pixels at percentile p (module docstring); ties in a map are broken in a random
    order drawn from the CPU `generator` (or from each map's own, a list of N)."""
    import torch

    n, height, width = maps.shape
    pixels = height * width
    if isinstance(generator, torch.Generator):
        ties = torch.randint(0, 2**32, (2, n, pixels), generator=generator)
    else:
        ties = torch.cat([torch.randint(0, 2**32, (2, 1, pixels), generator=own) for own in generator], dim=1)
    ties = ties.to(maps.device)
    masks = []
    for direction, values in enumerate((1 - maps, maps)):  # grad-cam ranks 1 - map for "least relevant first"
        bits = (values.reshape(n, pixels).float() + 0.0).view(torch.int32).long()  # + 0.0: -0 is 0
        order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) * 2**32 + ties[direction]  # the floats' order, then ties
        # the k pixels of lowest rank are those up to the k-th smallest key (two tied values whose 32
        # random bits also tie, at the k-th key, keep one pixel more: a chance below 1e-5 a removal)
        masks.append(torch.stack([order <= order.kthvalue(k, dim=1).values[:, None] if k else
                                  torch.zeros_like(order, dtype=torch.bool)
                                  for k in (_kept_count(pixels, p) for p in percentiles)]))
    return torch.stack(masks).view(2, len(percentiles), n, height, width)


def _kept_count(pixels: int, percentile: float) -> int:
    """How many of `pixels` distinct values lie below np.percentile(values, p) (linear interpolation)."""
    return math.ceil((pixels - 1) * percentile / 100)


def _removal_noise(pixels: int, channels: int, percentiles: Sequence[float], images: int, generator) -> list:
    """grad-cam's imputation noise in its order (direction, percentile, image), from one CPU
    `generator` (or each image's own, a list): per removal a
    (channels, removed pixels) CPU tensor, the removed pixels in raster order (grad-cam's
    `randn_like` of its transposed solution fills channel after channel: scipy returns the
    solution column-major)."""
    import torch

    if isinstance(generator, torch.Generator):
        return [NOISE * torch.randn(channels, pixels - _kept_count(pixels, p), generator=generator)
                for _ in range(2) for p in percentiles for _ in range(images)]
    own = [_removal_noise(pixels, channels, percentiles, 1, one) for one in generator]  # per image, in its order
    return [own[image][removal] for removal in range(2 * len(percentiles)) for image in range(images)]


def impute(x, unknown, noise=None):
    """x (M, C, H, W) with the pixels where `unknown` (M, H, W) is True replaced by the
    solution of grad-cam's imputation system (plus `noise`: per image a (C, removed pixels)
    tensor), on x's device."""
    import torch

    unknown = unknown[:, None]
    mask = unknown.to(x.dtype)
    known = x * (1 - mask)
    rhs = _blur12(known).mul_(mask / 12)  # the weighted sum of the known neighbours (known is 0 under the mask)
    solution = _conjugate_gradient(_hierarchy(mask), rhs)
    if noise is not None:  # scattered into place: indexing the solution by the mask would cost a nonzero()
        drawn = torch.cat([values.reshape(-1) for values in noise]).to(x.device, x.dtype)  # masked_scatter_: one dtype
        where = unknown.expand_as(x)
        if drawn.numel() != int(where.sum()):  # masked_scatter_ would take a longer noise's first values silently
            raise ValueError(f"{drawn.numel()} noise values for {int(where.sum())} imputed ones")
        solution += torch.zeros_like(solution).masked_scatter_(where, drawn)
    return torch.where(unknown, solution, x)


def _blur12(v, rows=None):
    """(b b^T) * v with b = (1, 2, 1), zero beyond the image: 12 x (the weighted sum of each
    pixel's neighbours plus v / 3; the centre's weight is 4 / 12), one axis after the other,
    two passes each. `rows`, a tensor like v, holds the first axis's (a new one without it)."""
    return _one_two_one(_one_two_one(v, -1, rows), -2)


def _one_two_one(v, axis: int, out=None):
    """(1, 2, 1) along axis -2 or -1 of v, zero beyond the image, into `out` (a new tensor
    without it): the two neighbours' sum where both or one exist, then twice v added."""
    import torch

    out = v.new_empty(v.shape) if out is None else out
    size = v.shape[axis]
    torch.add(_along(v, axis, slice(0, size - 2)), _along(v, axis, slice(2, size)),
              out=_along(out, axis, slice(1, size - 1)))
    if size > 1:
        _along(out, axis, slice(0, 1)).copy_(_along(v, axis, slice(1, 2)))
        _along(out, axis, slice(size - 1, size)).copy_(_along(v, axis, slice(size - 2, size - 1)))
    else:
        out.zero_()
    return out.add_(v, alpha=2)


class _Level:
    """One grid of the multigrid hierarchy: the operator on vectors that are zero outside `mask`
    (float (M, 1, h, w)) as a stencil (M, 9, h, w) (the weight of each OFFSETS neighbour), its
    l1-Jacobi smoother (convergent for any stencil), and on the coarsest grid the inverse."""

    def __init__(self, stencil):
        self.stencil = stencil
        self.mask = (stencil[:, 4:5] > 0).to(stencil.dtype)
        self.smoother = self.mask / stencil.abs().sum(1, keepdim=True).clamp_min(1e-30)
        self.inverse = None
        # out[i] += weight_e[i] v[i + e] where i + e lies in the grid: the cells and weights, sliced once
        self.neighbours = [((..., _overlap(dy), _overlap(dx)), (..., _overlap(-dy), _overlap(-dx)),
                            stencil[:, e:e + 1, _overlap(dy), _overlap(dx)])
                           for e, (dy, dx) in enumerate(OFFSETS) if dy or dx]

    def apply(self, v):
        out = self.stencil[:, 4:5] * v
        for here, there, weight in self.neighbours:
            out[here].addcmul_(weight, v[there])
        return out

    def cycle(self, coarser: list, r):
        """One symmetric V-cycle from this grid down (an approximate inverse applied to r)."""
        import torch

        if self.inverse is not None:
            m, channels, height, width = r.shape
            return torch.einsum("mij,mcj->mci", self.inverse, r.reshape(m, channels, -1)).view_as(r) * self.mask
        z = self.smoother * r
        coarse = coarser[0].cycle(coarser[1:], _restrict(self.residual(r, z)))
        z.addcmul_(self.mask, _prolong(coarse, r.shape[-2:]))
        return z.addcmul_(self.smoother, self.residual(r, z))

    def residual(self, r, z):
        """r - A z (in the memory of A z)."""
        import torch

        az = self.apply(z)
        return torch.sub(r, az, out=az)

    def invert(self) -> None:
        """The coarsest grid (a few dozen cells): a dense matrix per system, identity rows
        outside the mask, pseudo-inverted once (a Galerkin operator is singular where masked
        interpolation makes two coarse cells reach the same imputed pixels alone; its
        eigenvalues below float32's resolution are rounding noise)."""
        import torch

        m, _, height, width = self.mask.shape
        cells = torch.arange(height * width, device=self.mask.device).view(height, width)
        dense = torch.diag_embed(1 - self.mask.reshape(m, -1)).double()
        for e, (dy, dx) in enumerate(OFFSETS):
            rows, cols = slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx))
            here = cells[rows, cols].reshape(-1)
            dense[:, here, here + dy * width + dx] += self.stencil[:, e, rows, cols].reshape(m, -1).double()
        self.inverse = torch.linalg.pinv(dense, rtol=1e-5, hermitian=True).to(self.mask.dtype)


class _Image(_Level):
    """The image grid: grad-cam's stencil as `_blur12` (two passes an axis), Jacobi smoothing (its high
    frequencies lie within [2/3, 3/2] x the diagonal)."""

    def __init__(self, mask):
        import torch

        self.mask, self.inverse = mask, None
        self.rows = None  # apply's first blur pass, one buffer reused
        height, width = mask.shape[-2:]
        # The weight of each pixel's in-image neighbours (1 inside, less on the border).
        self.weights = _blur12(torch.ones(1, 1, height, width, dtype=mask.dtype, device=mask.device)) / 12 - 1 / 3
        self.smoother = mask / self.weights
        self.diagonal, self.outside = mask * (self.weights + 1 / 3), mask / -12  # what apply needs, ready

    def apply(self, v):  # mask (weights v - neighbour sum) = mask ((weights + 1/3) v - _blur12(v) / 12)
        return self._blur12(v).mul_(self.outside).addcmul_(self.diagonal, v)

    def residual(self, r, z):
        """r - A z, two passes after the blur: r + mask _blur12(z) / 12 - diagonal z."""
        import torch

        blurred = self._blur12(z)
        return torch.addcmul(r, blurred, self.outside, value=-1, out=blurred).addcmul_(self.diagonal, z, value=-1)

    def _blur12(self, v):
        if self.rows is None or self.rows.shape != v.shape:
            self.rows = v.new_empty(v.shape)
        return _blur12(v, self.rows)

    def as_stencil(self):
        """The operator as a stencil (M, 9, h, w) for `_galerkin`, zero-padded to odd sides:
        centre = the in-image neighbours' weight, neighbour e = -its weight where both pixels
        are imputed."""
        import torch
        import torch.nn.functional as F

        height, width = self.mask.shape[-2:]
        h, w = 2 * (height // 2) + 1, 2 * (width // 2) + 1
        padded = F.pad(self.mask[:, 0], (1, w - width + 1, 1, h - height + 1))
        inner = padded[:, 1:h + 1, 1:w + 1]
        stencil = inner.new_empty((len(inner), len(OFFSETS), h, w))
        weighted = {EDGE: inner * -EDGE, CORNER: inner * -CORNER}  # one pass a field below
        for e, (dy, dx) in enumerate(OFFSETS):
            if dy or dx:
                torch.mul(weighted[CORNER if dy and dx else EDGE], padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w],
                          out=stencil[:, e])
            else:
                torch.mul(inner, F.pad(self.weights[0, 0], (0, w - width, 0, h - height)), out=stencil[:, e])
        return stencil


def _hierarchy(mask) -> list[_Level]:
    """The grids from `mask` (float (M, 1, H, W), 1 where a pixel is imputed) down to one of at
    most COARSEST cells a side, each about half the size of the last (cell i on fine cell 2i,
    the last one beyond the image if the side is even, so every fine cell lies between two)."""
    levels = [_Image(mask)]
    stencil = levels[0].as_stencil()
    while len(levels) == 1 or max(stencil.shape[-2:]) > COARSEST:  # the image grid is never inverted
        stencil = _galerkin(stencil)
        levels.append(_Level(stencil))
    levels[-1].invert()
    return levels


def _galerkin(stencil):
    """The coarse operator P^T A P (P bilinear interpolation) of a 3x3 stencil (M, 9, h, w), as
    a coarse 3x3 stencil: one strided convolution, weight[d, e, t] = p(t) p(t + e - 2d) with p
    the bilinear weights of a coarse cell on the fine cells t in {-1, 0, 1}^2 around it."""
    import torch
    import torch.nn.functional as F

    def hat(t: int) -> float:
        return 1 - abs(t) / 2 if abs(t) <= 1 else 0.0

    steps = (-1, 0, 1)
    line = torch.tensor([[[hat(t) * hat(t + e - 2 * d) for t in steps] for e in steps] for d in steps],
                        dtype=stencil.dtype, device=stencil.device)  # one axis: [d, e, t]
    kernel = torch.einsum("aep,bfq->abefpq", line, line).reshape(9, 9, 3, 3)
    height, width = stencil.shape[-2:]
    if height % 2 == 0 or width % 2 == 0:
        stencil = F.pad(stencil, (0, 1 - width % 2, 0, 1 - height % 2))
    return F.conv2d(stencil, kernel, stride=2, padding=1).contiguous()


def _restrict(v):
    """P^T v: (M, C, H, W) -> (M, C, H // 2 + 1, W // 2 + 1), full weighting: coarse cell i
    takes fine cell 2i and half of each of its two neighbours, along both axes."""
    return _restrict_axis(_restrict_axis(v, -2), -1)


def _restrict_axis(v, axis: int):
    """P^T along one axis (-2 or -1) of v, in place on a new tensor (no temporaries)."""
    size = v.shape[axis]
    shape = list(v.shape)
    shape[axis] = size // 2 + 1
    out = v.new_empty(shape)
    even, odd = _along(v, axis, slice(0, None, 2)), _along(v, axis, slice(1, None, 2))
    n_even, n_odd = even.shape[axis], odd.shape[axis]
    _along(out, axis, slice(0, n_even)).copy_(even)
    _along(out, axis, slice(n_even, None)).zero_()
    _along(out, axis, slice(0, n_odd)).add_(odd, alpha=0.5)
    _along(out, axis, slice(1, n_odd + 1)).add_(odd, alpha=0.5)
    return out


def _along(v, axis: int, cells: slice):
    """v's cells along axis -2 or -1."""
    return v[..., cells, :] if axis == -2 else v[..., cells]


def _overlap(shift: int) -> slice:
    """The cells i of an axis whose neighbour i + shift lies on it."""
    return slice(max(0, -shift), -shift if shift > 0 else None)


def _prolong(v, size):
    """P v: bilinear interpolation from the coarse grid (cell i at fine 2i) to `size`."""
    return _prolong_axis(_prolong_axis(v, -2, size[0]), -1, size[1])


def _prolong_axis(v, axis: int, size: int):
    """P along one axis: coarse cell i to fine cell 2i, the midpoints between them, `size` cells."""
    import torch

    shape = list(v.shape)
    shape[axis] = size
    out = v.new_empty(shape)
    n_even, n_odd = (size + 1) // 2, size // 2
    _along(out, axis, slice(0, None, 2)).copy_(_along(v, axis, slice(0, n_even)))
    torch.lerp(_along(v, axis, slice(0, n_odd)), _along(v, axis, slice(1, n_odd + 1)), 0.5,
               out=_along(out, axis, slice(1, None, 2)))
    return out


def _conjugate_gradient(levels: list[_Level], rhs):
    """Solve levels[0] x = rhs for every (M, C) system at once, preconditioned by a V-cycle,
    until every relative residual is below TOLERANCE."""
    import torch

    def dot(a, b):
        return torch.linalg.vecdot(a.flatten(-2), b.flatten(-2))[..., None, None]

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp_min(1e-30), 0.0)

    finest, coarser = levels[0], levels[1:]
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = finest.cycle(coarser, r)
    p, rz = z, dot(r, z)
    limit = TOLERANCE * rhs.norm(dim=(-2, -1))
    for _ in range(MAX_ITERATIONS):
        q = finest.apply(p)
        alpha = ratio(rz, dot(p, q))
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1)
        if bool((r.norm(dim=(-2, -1)) <= limit).all()):
            break
        z = finest.cycle(coarser, r)
        rz, rz_old = dot(r, z), rz
        p = torch.addcmul(z, ratio(rz, rz_old), p, out=p)
    return x
