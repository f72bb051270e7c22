"""Deterministic synthetic H&E-like tiles with exact instance label maps.

The project's CPU demo trains on these tiles, and tests use them as fixtures, so they must be
both plausible (stain colours, stroma texture, crowded and overlapping nuclei) and learnable
in a few minutes: nuclei are the only haematoxylin-rich (purple) objects in a tile.

Rendering works in optical density (OD), as in colour deconvolution (Ruifrok & Johnston):
per-pixel haematoxylin and eosin concentration maps are mixed with per-tile perturbed stain
vectors and converted with Beer-Lambert, ``rgb = white * exp(-OD)``. The label map is final
before rendering starts, so the image shows exactly the nuclei that the labels contain.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import polygon as draw_polygon
from skimage.segmentation import find_boundaries

from ..utils import atomic_path

__all__ = ["MIN_NUCLEUS_AREA", "generate_tile", "ensure_synthetic_split"]

# Nuclei whose visible (unoccluded, clipped) area falls below this many pixels are dropped.
MIN_NUCLEUS_AREA = 15
# Bump when generate_tile's output changes (it names the cache folders).
GENERATOR_VERSION = 1

# Reference H&E stain vectors in OD space (Macenko et al. reference, as used by common stain
# normalisers). skimage's default eosin vector gives magenta rather than H&E pink, hence not it.
_HAEMATOXYLIN_OD = np.array([0.5626, 0.7201, 0.4062])
_EOSIN_OD = np.array([0.2159, 0.8012, 0.5581])

# Nucleus kinds, with their typical look at 40x-like scale.
_NORMAL, _VESICULAR, _LYMPHOCYTE, _SPINDLE = 0, 1, 2, 3

SizeLike = Union[int, Sequence[int]]


def _as_hw(size: SizeLike) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = (int(s) for s in size)
    return height, width


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~``scale`` pixels."""
    # Filtering a coarse grid and upsampling is much cheaper than a wide filter at full size.
    step = max(1, int(scale // 3))
    coarse_shape = (shape[0] // step + 4, shape[1] // step + 4)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), scale / step, mode="wrap")
    field = ndimage.zoom(coarse, step, order=1)[: shape[0], : shape[1]]
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _blob_polygon(rng, center_yx, semi_axes, angle, irregularity, num_points=40):
    """Vertices (rows, cols) of a rotated ellipse with a smooth random radial perturbation."""
    theta = np.linspace(0.0, 2.0 * np.pi, num_points, endpoint=False)
    harmonics = np.arange(2, 6)
    amplitudes = rng.normal(0.0, irregularity, size=harmonics.size) / harmonics * 2.0
    phases = rng.uniform(0.0, 2.0 * np.pi, size=harmonics.size)
    waves = np.cos(harmonics[:, None] * theta + phases[:, None])
    radial = 1.0 + (amplitudes[:, None] * waves).sum(axis=0)
    radial = np.clip(radial, 0.65, 1.35)
    along = semi_axes[0] * radial * np.cos(theta)
    across = semi_axes[1] * radial * np.sin(theta)
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    rows = center_yx[0] + along * sin_a + across * cos_a
    cols = center_yx[1] + along * cos_a - across * sin_a
    return rows, cols


def _lumen_mask(rng, height, width):
    """Hard mask of white spaces (gland lumina, vessels, tears) and their shapes for lining."""
    mask = np.zeros((height, width), bool)
    lumina = []
    for _ in range(rng.choice(4, p=[0.3, 0.35, 0.25, 0.1])):
        center = rng.uniform([0, 0], [height, width])
        semi_axes = rng.uniform(8, 34) * np.array([1.0, rng.uniform(0.45, 1.0)])
        angle = rng.uniform(0, np.pi)
        rows, cols = _blob_polygon(rng, center, semi_axes, angle, 0.12, 48)
        rr, cc = draw_polygon(rows, cols, (height, width))
        mask[rr, cc] = True
        lumina.append((center, semi_axes, angle))
    return mask, lumina


def _sample_nuclei(rng, height, width, lumen, lumina, fibre_angle):
    """Nucleus centres, semi-axes, angles and kinds, placed with limited mutual overlap."""
    # Log-uniform target count: as many sparse tiles as crowded ones.
    target = int(round(np.exp(rng.uniform(np.log(14), np.log(95)))))
    crowding = np.log(target / 14) / np.log(95 / 14)  # 0 sparse .. 1 crowded
    # Centre spacing as a fraction of the summed radii: < 1 lets neighbours touch or overlap.
    spacing = rng.uniform(0.85, 1.05) - 0.3 * crowding * rng.uniform(0.5, 1.0)
    kind_probs = np.array([1.0, rng.uniform(0, 0.5), rng.uniform(0, 0.6), rng.uniform(0, 0.5)])
    kind_probs /= kind_probs.sum()
    num_clusters = rng.integers(1, 4)
    cluster_centres = rng.uniform([0, 0], [height, width], size=(num_clusters, 2))
    cluster_sigma = rng.uniform(18, 45, size=num_clusters)
    clustered_fraction = rng.uniform(0.2, 0.8)
    lined = [lum for lum in lumina if rng.random() < 0.6]

    centres, radii, nuclei = [], [], []
    for _ in range(target * 25):
        if len(nuclei) >= target:
            break
        kind = rng.choice(4, p=kind_probs)
        if kind == _LYMPHOCYTE:
            major = rng.uniform(3.8, 5.5)
            semi_axes = (major, major * rng.uniform(0.85, 1.0))
        elif kind == _SPINDLE:
            major = rng.uniform(8, 14)
            semi_axes = (major, major * rng.uniform(0.28, 0.45))
        elif kind == _VESICULAR:
            major = rng.uniform(8, 14)
            semi_axes = (major, major * rng.uniform(0.6, 1.0))
        else:
            major = rng.uniform(5.5, 12)
            semi_axes = (major, major * rng.uniform(0.5, 1.0))
        angle = rng.uniform(0, np.pi)

        placement = rng.random()
        if lined and kind != _SPINDLE and placement < 0.35:
            # Epithelial lining: nuclei ring a lumen, long axis pointing away from it.
            (cy, cx), (la, lb), lum_angle = lined[rng.integers(len(lined))]
            t = rng.uniform(0, 2 * np.pi)
            offset = semi_axes[0] + rng.uniform(1, 4)
            along = (la + offset) * np.cos(t)
            across = (lb + offset) * np.sin(t)
            centre = (cy + along * np.sin(lum_angle) + across * np.cos(lum_angle),
                      cx + along * np.cos(lum_angle) - across * np.sin(lum_angle))
            angle = np.arctan2(centre[0] - cy, centre[1] - cx) + rng.normal(0, 0.2)
        elif kind != _SPINDLE and placement < 0.35 + clustered_fraction:
            k = rng.integers(num_clusters)
            centre = cluster_centres[k] + rng.normal(0, cluster_sigma[k], 2)
        else:
            centre = rng.uniform([-4, -4], [height + 4, width + 4])
        if kind == _SPINDLE:
            # Fibroblast nuclei follow the collagen fibres.
            angle = fibre_angle + rng.normal(0, 0.15)

        row, col = int(round(centre[0])), int(round(centre[1]))
        if 0 <= row < height and 0 <= col < width and lumen[row, col]:
            continue
        radius = float(np.sqrt(semi_axes[0] * semi_axes[1]))
        if centres:
            gaps = np.hypot(*(np.asarray(centres) - np.asarray(centre)).T)
            if np.any(gaps < spacing * (np.asarray(radii) + radius)):
                continue
        centres.append(centre)
        radii.append(radius)
        nuclei.append((centre, semi_axes, angle, kind))
    return nuclei


def _draw_labels(rng, nuclei, height, width):
    """Label map (later nuclei on top), per-id kind, and per-pixel count of covering nuclei."""
    labels = np.zeros((height, width), np.int32)
    coverage = np.zeros((height, width), np.uint8)
    kinds = [0]  # index 0 = background
    for centre, semi_axes, angle, kind in nuclei:
        irregularity = rng.uniform(0.02, 0.05) if kind == _LYMPHOCYTE else rng.uniform(0.03, 0.13)
        rows, cols = _blob_polygon(rng, centre, semi_axes, angle, irregularity)
        rr, cc = draw_polygon(rows, cols, (height, width))
        if rr.size == 0:
            continue
        kinds.append(kind)
        labels[rr, cc] = len(kinds) - 1
        coverage[rr, cc] += 1
    kinds = np.asarray(kinds)

    # Occlusion can split a nucleus: keep its largest 4-connected part, so every instance is
    # one component; the orphaned pieces become background and are rendered as such.
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        own = labels[box] == index
        parts, num_parts = ndimage.label(own)
        if num_parts > 1:
            sizes = np.bincount(parts.ravel())
            sizes[0] = 0
            labels[box][own & (parts != sizes.argmax())] = 0

    areas = np.bincount(labels.ravel(), minlength=kinds.size)
    keep = areas >= MIN_NUCLEUS_AREA
    keep[0] = True
    new_ids = np.cumsum(keep) - 1  # contiguous 1..N in drawing order; 0 stays 0
    new_ids[~keep] = 0
    labels = new_ids[labels].astype(np.int32)
    coverage[labels == 0] = 0
    return labels, kinds[keep], coverage


def _fibre_field(rng, height, width, angle):
    """Wavy collagen-like streaks along ``angle``: anisotropically smoothed noise, resampled."""
    side = int(np.ceil(np.hypot(height, width))) + 16
    streaks = ndimage.gaussian_filter(
        rng.standard_normal((side, side)).astype(np.float32),
        sigma=(rng.uniform(0.8, 1.8), rng.uniform(8, 20)),
    )
    streaks /= streaks.std() + 1e-8
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy -= height / 2
    xx -= width / 2
    along = xx * np.cos(angle) + yy * np.sin(angle)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    across += rng.uniform(4, 14) * _smooth_noise(rng, (height, width), rng.uniform(25, 60))
    return ndimage.map_coordinates(streaks, [across + side / 2, along + side / 2], order=1)


def _soft_disks(rng, height, width, count, radius_range, sigma):
    """Sum of blurred random ellipses: pink blobs, red cells and the like."""
    mask = np.zeros((height, width), np.float32)
    for _ in range(count):
        major = rng.uniform(*radius_range)
        rows, cols = _blob_polygon(
            rng, rng.uniform([0, 0], [height, width]), (major, major * rng.uniform(0.6, 1.0)),
            rng.uniform(0, np.pi), 0.08, 24,
        )
        rr, cc = draw_polygon(rows, cols, (height, width))
        mask[rr, cc] = 1.0
    return ndimage.gaussian_filter(mask, sigma) if count else mask


def _render(rng, labels, kinds, coverage, lumen, fibre_angle):
    """RGB uint8 image for an already final label map."""
    height, width = labels.shape
    nuclear = labels > 0
    num_ids = kinds.size

    # --- eosin: stroma with fibres, density variation, white spaces, distractor blobs ---
    fibres = _fibre_field(rng, height, width, fibre_angle)
    looseness = rng.uniform(0.0, 0.6) + 0.25 * _smooth_noise(rng, (height, width), 50)
    # A steep squash of the streaks leaves pale gaps between collagen bundles in loose stroma.
    fibre_density = 1.0 / (1.0 + np.exp(-(fibres * rng.uniform(1.2, 2.5) + 1.5 - 2.5 * looseness)))
    stroma_level = rng.uniform(0.3, 0.75)
    eosin = stroma_level * (0.25 + 0.85 * fibre_density)
    eosin *= np.exp(0.2 * _smooth_noise(rng, (height, width), rng.uniform(30, 80)))

    # Cytoplasm around nuclei: paler or pinker than the stroma depending on tissue.
    distance_out = ndimage.distance_transform_edt(~nuclear)
    cytoplasm = np.exp(-((distance_out / rng.uniform(4, 12)) ** 2)).astype(np.float32)
    eosin += cytoplasm * (rng.uniform(0.2, 0.6) - eosin) * rng.uniform(0.4, 0.95)

    # Pink distractors (eosinophilic cytoplasm, protein) and red blood cells: dense eosin, no H.
    eosin += rng.uniform(0.3, 0.7) * _soft_disks(
        rng, height, width, rng.integers(0, 6), (6, 20), 2.0)
    red_cells = _soft_disks(rng, height, width, rng.choice([0, 0, 3, 10, 25]), (3.5, 5), 0.7)
    eosin += rng.uniform(0.8, 1.4) * red_cells

    lumen_soft = ndimage.gaussian_filter(lumen.astype(np.float32), rng.uniform(0.8, 2.0))
    eosin *= 1.0 - 0.93 * lumen_soft

    # --- haematoxylin: nuclei only, plus a faint tint in the tissue ---
    haem = (rng.uniform(0.02, 0.07) * (1.0 - lumen_soft)).astype(np.float32)

    level = np.empty(num_ids, np.float32)
    rim = np.zeros(num_ids, np.float32)
    pale_centre = np.zeros(num_ids, np.float32)
    chromatin_amp = np.empty(num_ids, np.float32)
    masks = {
        _NORMAL: kinds == _NORMAL, _VESICULAR: kinds == _VESICULAR,
        _LYMPHOCYTE: kinds == _LYMPHOCYTE, _SPINDLE: kinds == _SPINDLE,
    }
    level[masks[_NORMAL]] = rng.uniform(0.85, 1.4, masks[_NORMAL].sum())
    level[masks[_VESICULAR]] = rng.uniform(0.75, 1.1, masks[_VESICULAR].sum())
    level[masks[_LYMPHOCYTE]] = rng.uniform(1.4, 1.9, masks[_LYMPHOCYTE].sum())
    level[masks[_SPINDLE]] = rng.uniform(1.0, 1.5, masks[_SPINDLE].sum())
    has_rim = masks[_NORMAL] & (rng.random(num_ids) < 0.4)
    rim[has_rim] = rng.uniform(0.15, 0.4, has_rim.sum())
    rim[masks[_VESICULAR]] = rng.uniform(0.5, 0.9, masks[_VESICULAR].sum())
    pale_centre[masks[_VESICULAR]] = rng.uniform(0.45, 0.7, masks[_VESICULAR].sum())
    chromatin_amp[:] = rng.uniform(0.15, 0.35, num_ids)
    chromatin_amp[masks[_VESICULAR]] = rng.uniform(0.35, 0.55, masks[_VESICULAR].sum())
    chromatin_amp[masks[_LYMPHOCYTE]] = 0.12

    # Distance to the nucleus' own outline (outlines between touching nuclei count too).
    outline = find_boundaries(labels, connectivity=1, mode="inner")
    depth = ndimage.distance_transform_edt(~outline).astype(np.float32)
    fine = ndimage.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 0.8)
    clumps = ndimage.gaussian_filter(rng.standard_normal((height, width)).astype(np.float32), 1.6)
    chromatin = fine / (fine.std() + 1e-8) + np.maximum(clumps / (clumps.std() + 1e-8) - 0.8, 0)

    interior = 1.0 - pale_centre[labels] * (1.0 - np.exp(-depth / 2.0))
    nucleus_haem = level[labels] * (
        interior * np.maximum(1.0 + chromatin_amp[labels] * chromatin, 0.3)
        + rim[labels] * np.exp(-depth / 1.3)
    )
    # Overlapping nuclei absorb twice where they overlap.
    nucleus_haem *= 1.0 + 0.3 * np.maximum(coverage.astype(np.float32) - 1.0, 0.0)
    # Nucleoli: a small dark dot near the centre of vesicular nuclei.
    nucleoli = np.zeros((height, width), np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or kinds[index] != _VESICULAR:
            continue
        own = labels[box] == index
        centre = np.array(ndimage.center_of_mass(own)) + rng.normal(0, 1.0, 2)
        yy, xx = np.ogrid[: own.shape[0], : own.shape[1]]
        dot = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= rng.uniform(1.0, 2.5) ** 2
        nucleoli[box][dot & own] = 1.0
    nucleus_haem += 0.9 * nucleoli

    haem = np.where(nuclear, nucleus_haem, haem)
    eosin = np.where(nuclear, rng.uniform(0.1, 0.3) + 0.3 * nucleoli, eosin)

    # --- stain variation, optics, noise ---
    haem *= rng.uniform(0.75, 1.25)
    eosin *= rng.uniform(0.7, 1.3)
    haem_vec = np.abs(_HAEMATOXYLIN_OD + rng.normal(0, 0.035, 3))
    eosin_vec = np.abs(_EOSIN_OD + rng.normal(0, 0.05, 3))
    haem_vec /= np.linalg.norm(haem_vec)
    eosin_vec /= np.linalg.norm(eosin_vec)
    optical_density = (haem[..., None] * haem_vec.astype(np.float32)
                       + eosin[..., None] * eosin_vec.astype(np.float32)
                       + rng.uniform(0.0, 0.05))
    white = rng.uniform(0.92, 1.0, 3).astype(np.float32)
    rgb = white * np.exp(-optical_density)
    blur = rng.uniform(0.4, 0.9)
    rgb = ndimage.gaussian_filter(rgb, (blur, blur, 0))
    rgb += rng.normal(0, rng.uniform(1.0, 3.5) / 255.0, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def generate_tile(
    rng: np.random.Generator, size: SizeLike = (256, 256)
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic H&E tile: (RGB uint8 (H, W, 3), int32 label map (H, W), ids 1..N)."""
    height, width = _as_hw(size)
    fibre_angle = rng.uniform(0, np.pi)
    lumen, lumina = _lumen_mask(rng, height, width)
    nuclei = _sample_nuclei(rng, height, width, lumen, lumina, fibre_angle)
    labels, kinds, coverage = _draw_labels(rng, nuclei, height, width)
    # White spaces never cover nuclei: the nucleus is the visible object.
    lumen &= labels == 0
    image = _render(rng, labels, kinds, coverage, lumen, fibre_angle)
    return image, labels


def _save_png_atomically(array: np.ndarray, path: Path) -> None:
    """Write ``path`` via a temp file and os.replace, so it is never seen half-written."""
    with atomic_path(path) as temp_name:
        Image.fromarray(array).save(temp_name, format="PNG", compress_level=1)


def _write_pair(image: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if labels.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{label_path}: {labels.max()} nuclei do not fit a uint16 label PNG")
    _save_png_atomically(image, image_path)
    _save_png_atomically(labels.astype(np.uint16), label_path)


def ensure_synthetic_split(
    cache_dir: Union[str, os.PathLike],
    split: str,
    num_images: int,
    size: SizeLike = (256, 256),
    seed: int = 0,
) -> list[tuple[str, str]]:
    """Write (once) and return ``[(image_png, uint16_label_png), ...]`` for a synthetic split.

    Tile ``i`` comes from ``np.random.default_rng([seed, i])``, so it does not depend on
    ``num_images`` nor on ``split``: give each split its own seed to keep them disjoint.
    Existing files are reused; missing ones (e.g. after an interrupted run) are generated.
    """
    height, width = _as_hw(size)
    # The generator's version is part of the name, so a changed generator never reuses old tiles.
    split_dir = Path(cache_dir) / f"{split}_v{GENERATOR_VERSION}_s{seed}_{height}x{width}"
    split_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(num_images):
        image_path = split_dir / f"img_{index:04d}.png"
        label_path = split_dir / f"lab_{index:04d}.png"
        if not (image_path.is_file() and label_path.is_file()):
            image, labels = generate_tile(np.random.default_rng([seed, index]), (height, width))
            _write_pair(image, labels, image_path, label_path)
        pairs.append((str(image_path), str(label_path)))
    return pairs


def _overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Image with instance outlines in green, for eyeballing."""
    shown = image.copy()
    shown[find_boundaries(labels, mode="inner")] = (0, 255, 0)
    return shown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs="+", default=[256, 256], help="H [W]")
    args = parser.parse_args(argv)
    size = (args.size[0], args.size[-1])
    args.outdir.mkdir(parents=True, exist_ok=True)
    for index in range(args.num):
        image, labels = generate_tile(np.random.default_rng([args.seed, index]), size)
        _write_pair(image, labels, args.outdir / f"img_{index:04d}.png",
                    args.outdir / f"lab_{index:04d}.png")
        _save_png_atomically(_overlay(image, labels), args.outdir / f"overlay_{index:04d}.png")
        print(f"{args.outdir / f'img_{index:04d}.png'}: {labels.max()} nuclei")


if __name__ == "__main__":
    main()
