"""Pictures of random fractals, made on the fly from iterated function systems: PixMix (Hendrycks et al., 2022)
mixes such pictures into training images, so the model meets structure that belongs to none of the ten
classes. Made from random numbers, so nothing is downloaded, shipped or taken from the photo sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAPS = (2, 4)            # affine maps per system, at least and at most
CONTRACTION = (0.4, 0.9)  # the largest stretch of each map: below 1, so the points settle on the attractor
POINTS = 2048            # points followed per picture...
STEPS = 24               # ...through this many random maps: after a dozen they are on the attractor


def fractal_pictures(count: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """count uint8 (count, 3, size, size) pictures: the attractor of a random iterated function system, drawn as
    the density of its points at twice the size and shrunk, in a random colour on a random background."""
    device = generator.device

    def uniform(*shape: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

    matrices = uniform(count, MAPS[1], 2, 2)
    stretch = torch.linalg.matrix_norm(matrices, ord=2).clamp_min(1e-6)
    matrices = matrices * (uniform(count, MAPS[1], low=CONTRACTION[0], high=CONTRACTION[1]) / stretch)[..., None, None]
    offsets = uniform(count, MAPS[1], 2)
    maps_used = torch.randint(MAPS[0], MAPS[1] + 1, (count, 1), generator=generator, device=device)
    points = uniform(count, POINTS, 2)
    system = torch.arange(count, device=device).view(count, 1)
    for _ in range(STEPS):
        chosen = (torch.rand(count, POINTS, generator=generator, device=device) * maps_used).long()
        points = (matrices[system, chosen] @ points.unsqueeze(-1)).squeeze(-1) + offsets[system, chosen]

    # Fit each attractor to the frame, then count its points per pixel at twice the size.
    low, high = points.amin(dim=1, keepdim=True), points.amax(dim=1, keepdim=True)
    cells = ((points - low) / (high - low).clamp_min(1e-6) * (2 * size - 1)).round().long()
    density = torch.zeros(count, (2 * size) ** 2, device=device)
    density.scatter_add_(1, cells[..., 1] * 2 * size + cells[..., 0], torch.ones(count, POINTS, device=device))
    density = F.avg_pool2d(density.view(count, 1, 2 * size, 2 * size), 2)
    shade = (density / density.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)).sqrt()
    colour, background = uniform(count, 3, 1, 1, low=0, high=255), uniform(count, 3, 1, 1, low=0, high=255)
    return (background + (colour - background) * shade).round().to(torch.uint8)
