"""Augmentations for nuclei images that keep image, label map and boxes aligned.

Geometric transforms (crop, flips, 90-degree rotations) are exact index permutations, so the
instance label map can travel through them as ``sem_seg`` without interpolation; the optional
rescale resamples it by nearest neighbour, so ids stay ids. Photometric transforms change only the
image: their ``apply_segmentation`` / ``apply_coords`` are identities.
"""
from typing import List, Sequence, Tuple

import numpy as np
from scipy import ndimage
from skimage.color import hed_from_rgb, rgb_from_hed

from detectron2.data import transforms as T
from detectron2.data.transforms import NoOpTransform, Transform

__all__ = [
    "Rot90Transform",
    "RandomRotation90",
    "LabelResizeTransform",
    "RandomRescale",
    "PhotometricTransform",
    "GaussianBlurTransform",
    "GaussianNoiseTransform",
    "ConvolutionTransform",
    "ChannelShuffleTransform",
    "StainJitterTransform",
    "RandomGaussianBlur",
    "RandomGaussianNoise",
    "RandomEmboss",
    "RandomSharpen",
    "RandomChannelShuffle",
    "RandomStainJitter",
    "emboss_kernel",
    "sharpen_kernel",
    "build_nuclei_augmentations",
]


# ----------------------------------------------------------------------------- geometric


class Rot90Transform(Transform):
    """Rotate by ``k`` * 90 degrees counter-clockwise, exactly as ``np.rot90(img, k)``.

    Args:
        h, w: size of the input image.
        k: number of quarter turns, any integer (taken modulo 4).
    """

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        self._set_attributes({"h": int(h), "w": int(w), "k": int(k) % 4})

    def _check_size(self, array: np.ndarray) -> None:
        if array.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"Rot90Transform built for size {(self.h, self.w)} got array of shape {array.shape}"
            )

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        self._check_size(img)
        # Copy: a negatively strided view cannot become a torch tensor later.
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Map continuous (x, y) coordinates; pixel (r, c) covers [c, c+1] x [r, r+1]."""
        x = coords[:, 0].copy()
        y = coords[:, 1].copy()
        if self.k == 1:  # out[i, j] = in[j, w-1-i]
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif self.k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        elif self.k == 3:  # out[i, j] = in[h-1-j, i]
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def output_size(self) -> Tuple[int, int]:
        """(height, width) after the rotation."""
        return (self.w, self.h) if self.k % 2 else (self.h, self.w)

    def inverse(self) -> "Rot90Transform":
        new_h, new_w = self.output_size()
        return Rot90Transform(new_h, new_w, -self.k)


class RandomRotation90(T.Augmentation):
    """Rotate by a multiple of 90 degrees, ``k`` drawn uniformly from ``ks``."""

    def __init__(self, ks: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        if len(ks) == 0:
            raise ValueError("RandomRotation90 needs at least one k")
        self._init({"ks": tuple(int(k) % 4 for k in ks)})

    def get_transform(self, image):
        k = self.ks[np.random.randint(len(self.ks))]
        if k == 0:
            return NoOpTransform()
        h, w = image.shape[:2]
        return Rot90Transform(h, w, k)


def nearest_source_indices(size: int, new_size: int) -> np.ndarray:
    """For each of ``new_size`` output pixels, the input pixel (of ``size``) under its centre; a centre
    on the boundary of two input pixels takes the later one (floor of the centre, as PIL's rule).

    Integer arithmetic: in floating point ``(i + 0.5) * size / new_size`` lands on either side of a
    boundary depending on rounding (26 -> 23 would take pixel 12 for output 11 instead of 13).
    """
    doubled_centres = (2 * np.arange(new_size, dtype=np.int64) + 1) * size
    return np.minimum(doubled_centres // (2 * new_size), size - 1)


class LabelResizeTransform(T.ResizeTransform):
    """Detectron2's ``ResizeTransform`` (image and coordinates as there), with label maps of any
    integer dtype resized by nearest neighbour at pixel centres, as PIL does for uint8.

    Detectron2 resizes a non-uint8 segmentation with ``torch.nn.functional.interpolate``, which has
    no nearest mode for uint16 or int32 (instance ids above 255).
    """

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        if segmentation.shape[:2] != (self.h, self.w):
            raise ValueError(
                f"LabelResizeTransform built for size {(self.h, self.w)} got a label map of shape "
                f"{segmentation.shape}"
            )
        rows = nearest_source_indices(self.h, self.new_h)
        cols = nearest_source_indices(self.w, self.new_w)
        return segmentation[rows[:, None], cols[None, :]]

    def inverse(self) -> "LabelResizeTransform":
        return LabelResizeTransform(self.new_h, self.new_w, self.h, self.w, self.interp)


class RandomRescale(T.Augmentation):
    """Resize the whole image by a factor drawn log-uniformly from ``scale_range`` (so 0.8 and 1.25
    are equally likely), keeping its aspect ratio: nuclei of other sizes and magnifications."""

    def __init__(self, scale_range: Sequence[float]):
        super().__init__()
        low, high = (float(value) for value in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"RandomRescale needs a range 0 < low <= high, got {tuple(scale_range)}")
        self._init({"scale_range": (low, high), "low": low, "high": high})  # scale_range: for repr

    def get_transform(self, image):
        scale = float(np.exp(np.random.uniform(np.log(self.low), np.log(self.high))))
        h, w = image.shape[:2]
        new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        if (new_h, new_w) == (h, w):
            return NoOpTransform()
        return LabelResizeTransform(h, w, new_h, new_w)


# ----------------------------------------------------------------------------- photometric


class PhotometricTransform(Transform):
    """Base for transforms that change pixel values only.

    Subclasses implement ``_apply_float(img: float32 HxWxC in 0-255) -> float32``; the result is
    rounded and clipped back to the input dtype when that is uint8.
    """

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = self._apply_float(np.asarray(img, dtype=np.float32))
        if img.dtype == np.uint8:
            return np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return out.astype(img.dtype, copy=False)

    def _apply_float(self, img: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def inverse(self) -> Transform:
        # Detectron2 convention: the inverse covers geometry only.
        return NoOpTransform()


def _per_channel_sigma(img: np.ndarray, sigma: float) -> Tuple[float, ...]:
    # Never blur across channels.
    return (sigma, sigma) + (0.0,) * (img.ndim - 2)


class GaussianBlurTransform(PhotometricTransform):
    """Gaussian blur of each channel with standard deviation ``sigma`` pixels."""

    def __init__(self, sigma: float):
        super().__init__()
        self._set_attributes({"sigma": float(sigma)})

    def _apply_float(self, img):
        return ndimage.gaussian_filter(img, sigma=_per_channel_sigma(img, self.sigma), mode="reflect")


class GaussianNoiseTransform(PhotometricTransform):
    """Add i.i.d. Gaussian noise of standard deviation ``std`` (0-255 units).

    The noise comes from ``seed`` so the transform is deterministic, as Detectron2 requires.
    """

    def __init__(self, std: float, seed: int):
        super().__init__()
        self._set_attributes({"std": float(std), "seed": int(seed)})

    def _apply_float(self, img):
        rng = np.random.default_rng(self.seed)
        return img + rng.normal(0.0, self.std, size=img.shape).astype(np.float32)


class ConvolutionTransform(PhotometricTransform):
    """Convolve each channel with a 2-D ``kernel`` (reflect padding)."""

    def __init__(self, kernel: np.ndarray):
        super().__init__()
        self._set_attributes({"kernel": np.asarray(kernel, dtype=np.float32)})

    def _apply_float(self, img):
        if img.ndim == 2:
            return ndimage.convolve(img, self.kernel, mode="reflect")
        return np.stack(
            [ndimage.convolve(img[..., c], self.kernel, mode="reflect") for c in range(img.shape[2])],
            axis=-1,
        )


_IDENTITY_KERNEL = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32)


def emboss_kernel(alpha: float, strength: float = 1.0) -> np.ndarray:
    """3x3 emboss kernel blended with the identity by ``alpha`` (imgaug's definition).

    Its weights sum to 1, so flat regions keep their brightness.
    """
    s = strength
    effect = np.array([[-1 - s, -s, 0], [-s, 1, s], [0, s, 1 + s]], dtype=np.float32)
    return (1 - alpha) * _IDENTITY_KERNEL + alpha * effect


def sharpen_kernel(alpha: float, lightness: float = 1.0) -> np.ndarray:
    """3x3 sharpen (Laplacian boost) kernel blended with the identity by ``alpha``.

    With ``lightness`` = 1 its weights sum to 1, so flat regions keep their brightness.
    """
    effect = -np.ones((3, 3), dtype=np.float32)
    effect[1, 1] = 8 + lightness
    return (1 - alpha) * _IDENTITY_KERNEL + alpha * effect


class ChannelShuffleTransform(PhotometricTransform):
    """Reorder channels: output channel ``i`` is input channel ``permutation[i]``."""

    def __init__(self, permutation: Sequence[int]):
        super().__init__()
        self._set_attributes({"permutation": tuple(int(i) for i in permutation)})

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        # Pure indexing: exact for any dtype, no float round trip.
        if img.ndim != 3 or img.shape[2] != len(self.permutation):
            raise ValueError(
                f"ChannelShuffleTransform{self.permutation} needs HxWx{len(self.permutation)}, "
                f"got {img.shape}"
            )
        return np.ascontiguousarray(img[..., list(self.permutation)])


# log(1e-6) is skimage's optical-density normaliser in rgb2hed/hed2rgb; reused so the stain
# values live on the same scale as skimage's HED space.
_LOG_ADJUST = np.log(1e-6)


class StainJitterTransform(PhotometricTransform):
    """H&E stain jitter: in HED space, ``stain = stain * scale + shift`` per channel.

    The image must be RGB. Uses skimage's HED matrices (same space as ``rgb2hed``/``hed2rgb``)
    but without ``rgb2hed``'s clamping of negative stain values: that clamp is not invertible,
    so identity jitter would already shift the colour of pixels outside the H&E gamut.
    """

    def __init__(self, scale: Sequence[float], shift: Sequence[float]):
        super().__init__()
        self._set_attributes(
            {
                "scale": np.asarray(scale, dtype=np.float64).reshape(3),
                "shift": np.asarray(shift, dtype=np.float64).reshape(3),
            }
        )

    def _apply_float(self, img):
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"StainJitterTransform needs an HxWx3 RGB image, got {img.shape}")
        rgb = np.maximum(img.astype(np.float64) / 255.0, 1e-6)
        stains = (np.log(rgb) / _LOG_ADJUST) @ hed_from_rgb
        stains = stains * self.scale + self.shift
        rgb = np.exp((stains @ rgb_from_hed) * _LOG_ADJUST)
        return (np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.float32)


def _uniform(value_range: Sequence[float]) -> float:
    low, high = float(value_range[0]), float(value_range[1])
    if low > high:
        raise ValueError(f"range {value_range} has low > high")
    return float(np.random.uniform(low, high))


class RandomGaussianBlur(T.Augmentation):
    """Gaussian blur with sigma ~ U(sigma_range)."""

    def __init__(self, sigma_range: Sequence[float] = (0.5, 1.5)):
        super().__init__()
        self._init({"sigma_range": tuple(sigma_range)})

    def get_transform(self, image):
        return GaussianBlurTransform(_uniform(self.sigma_range))


class RandomGaussianNoise(T.Augmentation):
    """Additive Gaussian noise with std ~ U(std_range), in 0-255 units."""

    def __init__(self, std_range: Sequence[float] = (2.0, 10.0)):
        super().__init__()
        self._init({"std_range": tuple(std_range)})

    def get_transform(self, image):
        return GaussianNoiseTransform(_uniform(self.std_range), np.random.randint(2**31 - 1))


class RandomEmboss(T.Augmentation):
    """Emboss filter blended with the original, blend weight ~ U(alpha_range)."""

    def __init__(self, alpha_range: Sequence[float] = (0.2, 0.5), strength: float = 1.0):
        super().__init__()
        self._init({"alpha_range": tuple(alpha_range), "strength": float(strength)})

    def get_transform(self, image):
        return ConvolutionTransform(emboss_kernel(_uniform(self.alpha_range), self.strength))


class RandomSharpen(T.Augmentation):
    """Sharpen filter blended with the original, blend weight ~ U(alpha_range)."""

    def __init__(self, alpha_range: Sequence[float] = (0.2, 0.5), lightness: float = 1.0):
        super().__init__()
        self._init({"alpha_range": tuple(alpha_range), "lightness": float(lightness)})

    def get_transform(self, image):
        return ConvolutionTransform(sharpen_kernel(_uniform(self.alpha_range), self.lightness))


class RandomChannelShuffle(T.Augmentation):
    """Random permutation of the image channels."""

    def get_transform(self, image):
        return ChannelShuffleTransform(np.random.permutation(image.shape[2]))


class RandomStainJitter(T.Augmentation):
    """H&E stain jitter: scale ~ U(1 - scale, 1 + scale), shift ~ U(-shift, shift) per channel."""

    def __init__(self, scale: float = 0.05, shift: float = 0.01):
        super().__init__()
        self._init({"scale": float(scale), "shift": float(shift)})

    def get_transform(self, image):
        return StainJitterTransform(
            np.random.uniform(1 - self.scale, 1 + self.scale, size=3),
            np.random.uniform(-self.shift, self.shift, size=3),
        )


# ----------------------------------------------------------------------------- builder


def build_nuclei_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """Augmentations for ``NucleiDatasetMapper``.

    Training order: random rescale (``INPUT.AUG.SCALE_PROB``, ``SCALE_RANGE``), random crop
    (``cfg.INPUT.CROP``, after the rescale, so crops keep their size), H/V flips, rot90, then photometric ones
    (stain jitter, blur, noise, emboss, sharpen, channel shuffle), each applied with its
    ``cfg.INPUT.AUG.*_PROB``. The image must be RGB (stain jitter).
    Without the rescale, training sees nuclei at their native magnification only.
    At test time: native resolution when ``INPUT.MIN_SIZE_TEST`` is 0 (nucseg-d2's default), else the
    shortest edge resized to it (capped by ``INPUT.MAX_SIZE_TEST``), exactly as NucleiPredictor
    does, so that evaluation and prediction see the same pixels; outputs come back at the
    original size (the model's post-processing rescales them to the record's height/width).
    """
    if not is_train:
        min_size = cfg.INPUT.MIN_SIZE_TEST
        if min_size < 0:
            raise ValueError(f"INPUT.MIN_SIZE_TEST must be >= 0 (0 = native resolution), got {min_size}")
        return [T.ResizeShortestEdge([min_size, min_size], cfg.INPUT.MAX_SIZE_TEST)] if min_size else []
    aug_cfg = cfg.INPUT.AUG
    augs: List[T.Augmentation] = []
    if aug_cfg.SCALE_PROB > 0 and tuple(aug_cfg.SCALE_RANGE) != (1.0, 1.0):
        augs.append(T.RandomApply(RandomRescale(aug_cfg.SCALE_RANGE), prob=aug_cfg.SCALE_PROB))
    if cfg.INPUT.CROP.ENABLED:
        # For an image smaller than the crop, Detectron2's "absolute" crop shrinks to the image
        # (no padding), so small images pass through whole.
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if aug_cfg.HFLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=True, vertical=False))
    if aug_cfg.VFLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=False, vertical=True))
    if aug_cfg.ROT90:
        augs.append(RandomRotation90())

    # Stain jitter comes first: its H&E unmixing assumes the image's true RGB, which the channel
    # shuffle, noise and filters after it no longer are.
    photometric = [
        (
            aug_cfg.STAIN_JITTER_PROB,
            lambda: RandomStainJitter(aug_cfg.STAIN_JITTER_SCALE, aug_cfg.STAIN_JITTER_SHIFT),
        ),
        (aug_cfg.GAUSSIAN_BLUR_PROB, lambda: RandomGaussianBlur(aug_cfg.GAUSSIAN_BLUR_SIGMA)),
        (aug_cfg.GAUSSIAN_NOISE_PROB, lambda: RandomGaussianNoise(aug_cfg.GAUSSIAN_NOISE_STD)),
        (aug_cfg.EMBOSS_PROB, lambda: RandomEmboss(aug_cfg.EMBOSS_STRENGTH)),
        (aug_cfg.SHARPEN_PROB, lambda: RandomSharpen(aug_cfg.SHARPEN_STRENGTH)),
        (aug_cfg.CHANNEL_SHUFFLE_PROB, RandomChannelShuffle),
    ]
    for prob, make_aug in photometric:
        if prob > 0:
            augs.append(T.RandomApply(make_aug(), prob=prob))
    return augs
