"""NucleiPredictor: a trained model over images of any size, tiled and stitched without seams."""
import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from tqdm import tqdm

from ..config import build_nuclei_cfg
from ..utils import first_few
from .result import PredictionResult
from .slides import ArraySource, ImageSource
from .tiling import (
    TTA_TRANSFORMS,
    DetectionStore,
    TileDetections,
    detections_from_instances,
    invert_detections,
    merge_by_mask_iou,
    tile_grid,
    transform_image,
)

__all__ = ["NucleiPredictor", "CheckpointError", "load_checkpoint", "require_checkpoint_path", "build_predict_cfg"]

logger = logging.getLogger(__name__)

# Modules that never run at inference (unless the semantic map is asked for): a checkpoint
# without them, e.g. a Mask R-CNN trained with our heads, still predicts the same instances.
_TRAINING_ONLY_PREFIXES = ("feature_fusion.", "sem_seg_head.")
_MAX_KEYS_LISTED = 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not match the model's architecture."""


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps the incompatible keys it would otherwise only log."""

    incompatible = None

    def _log_incompatible_keys(self, incompatible):
        self.incompatible = incompatible


def _key_list(keys: Sequence[str]) -> str:
    return first_few(sorted(keys), _MAX_KEYS_LISTED)


def require_checkpoint_path(path: str, given_as: str = "--weights or MODEL.WEIGHTS") -> None:
    """CheckpointError for an empty path (Detectron2 would go on with an untrained model) or a local
    file that is not there; an address (``://``) is fetched, or refused, when loaded."""
    if not path:
        raise CheckpointError(f"no checkpoint given ({given_as})")
    if "://" not in path and not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")


def load_checkpoint(model: torch.nn.Module, path: str, what: str = "the model") -> None:
    """Load ``path`` into ``model`` with DetectionCheckpointer, refusing any mismatch.

    Raises CheckpointError naming the file and the missing (in the model, not in the file),
    unexpected (in the file, not in the model) and wrongly shaped keys.
    """
    require_checkpoint_path(path)
    if "://" in path:  # detectron2://, https://, ...: fetched (and cached) as Detectron2 would
        try:
            local_path = PathManager.get_local_path(path)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot fetch checkpoint ({type(err).__name__}: {err})") from err
        if not os.path.isfile(local_path):
            raise CheckpointError(f"{path}: fetched to {local_path}, but no file is there")
        path = local_path
    checkpointer = _RecordingCheckpointer(model)
    try:
        checkpointer.load(path, checkpointables=[])
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(err).__name__}: {err})") from err
    incompatible = checkpointer.incompatible
    if incompatible is None:
        return
    missing = list(incompatible.missing_keys)
    if not getattr(model, "return_semantic", False):
        missing = [k for k in missing if not k.startswith(_TRAINING_ONLY_PREFIXES)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_key_list(missing)}")
    if incompatible.unexpected_keys:
        problems.append(f"unexpected keys ({len(incompatible.unexpected_keys)}): "
                        f"{_key_list(incompatible.unexpected_keys)}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k} {tuple(a)} in file vs {tuple(b)} in model"
                  for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"wrongly shaped keys ({len(shapes)}): {_key_list(shapes)}")
    if problems:
        raise CheckpointError(
            f"{path}: checkpoint does not match the architecture of {what}; "
            + "; ".join(problems)
        )


def build_predict_cfg(cfg_or_config_file: Union[str, CfgNode], opts: Sequence[str] = ()) -> CfgNode:
    """A frozen config from a YAML path (with ``opts`` overrides) or a copy of a CfgNode."""
    cfg = build_nuclei_cfg(cfg_or_config_file, opts)
    cfg.freeze()
    return cfg


class NucleiPredictor:
    """Predict nuclei in an image or slide region of any size.

    Images up to ``tile_size`` run in one pass; larger ones are cut into ``tile_size`` tiles
    overlapping by ``overlap`` px, run in batches of ``batch_size``, and stitched: each
    nucleus is kept once, from the tile in which it lies farthest from the border (see
    :mod:`nucseg_d2.predict.tiling`), then all kept detections are painted by descending score
    with the rules of :func:`~nucseg_d2.modeling.postprocess.instances_to_label_map`. Memory is
    that of one batch of tiles plus the output label map and bit-packed masks, never a
    full-image float array. Choose ``overlap`` at least the largest nucleus diameter (60 px at
    40x) so every nucleus is whole in the tile that decides it.

    Args:
        cfg_or_config_file: a config YAML path or CfgNode (with nucseg keys).
        weights: checkpoint path; default ``cfg.MODEL.WEIGHTS``. When both are empty the model
            stays randomly initialised (with a warning): only useful for timing.
        device: "cpu", "cuda", "cuda:1", ...; default ``cfg.MODEL.DEVICE`` (CPU if no GPU).
        tile_size, overlap: tiling in pixels.
        batch_size: tiles per forward pass; default 4 on GPU, 1 on CPU.
        tta: also run horizontally/vertically flipped and 90°-rotated tiles and merge
            detections whose masks overlap with IoU > 0.5, keeping the highest score.
        score_thresh, mask_thresh, max_overlap: default ``cfg.TEST.NUCLEI``.
        progress: show a tqdm bar (tiles/s, ETA).
        model: a ready model to use instead of building one (weights are then not loaded); one
            built with MODEL.NUCSEG.PASTE_FULL_MASKS returns masks binarised at its own threshold.
        opts: config overrides ("KEY", value, ...) applied to a YAML config.
    """

    def __init__(
        self,
        cfg_or_config_file: Union[str, CfgNode, None] = None,
        weights: Optional[str] = None,
        device: Optional[str] = None,
        tile_size: int = 1024,
        overlap: int = 128,
        batch_size: Optional[int] = None,
        tta: bool = False,
        score_thresh: Optional[float] = None,
        mask_thresh: Optional[float] = None,
        max_overlap: Optional[float] = None,
        progress: bool = False,
        model: Optional[torch.nn.Module] = None,
        opts: Sequence[str] = (),
    ):
        if cfg_or_config_file is None and model is None:
            raise ValueError("give a config (file or CfgNode), or a ready model")
        if tile_size <= 0 or not 0 <= overlap < tile_size:
            raise ValueError(f"need tile_size > 0 and 0 <= overlap < tile_size, got {tile_size}, {overlap}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (or None for the device's default), got {batch_size}")
        self.cfg = build_predict_cfg(cfg_or_config_file, opts) if cfg_or_config_file is not None else None
        nuclei = self.cfg.TEST.NUCLEI if self.cfg is not None else None
        self.score_thresh = score_thresh if score_thresh is not None else (nuclei.SCORE_THRESH if nuclei else 0.5)
        self.mask_thresh = mask_thresh if mask_thresh is not None else (nuclei.MASK_THRESH if nuclei else 0.5)
        self.max_overlap = max_overlap if max_overlap is not None else (nuclei.MAX_OVERLAP if nuclei else 0.7)
        # The bounds validate_nucseg_config sets on TEST.NUCLEI (MASK_THRESH 0 keeps whole boxes).
        if not (0 <= self.score_thresh <= 1 and 0 < self.mask_thresh < 1 and 0 <= self.max_overlap <= 1):
            raise ValueError(f"need 0 <= score_thresh <= 1, 0 < mask_thresh < 1 and 0 <= max_overlap <= 1, got "
                             f"{self.score_thresh}, {self.mask_thresh}, {self.max_overlap}")
        self.input_format = self.cfg.INPUT.FORMAT if self.cfg is not None else "RGB"
        min_size = self.cfg.INPUT.MIN_SIZE_TEST if self.cfg is not None else 0
        self.resize = (T.ResizeShortestEdge([min_size, min_size], self.cfg.INPUT.MAX_SIZE_TEST)
                       if min_size else None)

        if device is None:
            # Configs say "cuda"; like train_net, fall back to the CPU quietly where there is none.
            device = self.cfg.MODEL.DEVICE if self.cfg is not None else "cpu"
            if device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"device {device!r} asked for but CUDA is not available; using the CPU")
            device = "cpu"
        self.device = torch.device(device)

        if model is None:
            cfg = self.cfg.clone()
            cfg.defrost()
            cfg.MODEL.DEVICE = str(self.device)
            # Box-local mask probabilities: the predictor's mask_thresh applies to them, and no
            # full-image mask per nucleus is ever held.
            cfg.MODEL.NUCSEG.PASTE_FULL_MASKS = False
            model = build_model(cfg)
            weights = weights if weights is not None else self.cfg.MODEL.WEIGHTS
            if weights:
                load_checkpoint(model, weights, what=f"{self.cfg.MODEL.META_ARCHITECTURE} "
                                                     f"({self._config_name(cfg_or_config_file)})")
            else:
                warnings.warn("no weights given: the model is randomly initialised")
        self.model = model.to(self.device).eval()
        self.weights = weights
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self.batch_size = int(batch_size if batch_size is not None else (4 if self.device.type == "cuda" else 1))
        self.transforms = TTA_TRANSFORMS if tta else ("identity",)
        self.progress = progress
        self.last_timing: Dict[str, float] = {}

    @staticmethod
    def _config_name(cfg_or_config_file) -> str:
        return os.fspath(cfg_or_config_file) if not isinstance(cfg_or_config_file, CfgNode) else "given config"

    # ---------------------------------------------------------------- public API
    def predict(self, image: np.ndarray, channel_order: str = "RGB") -> PredictionResult:
        """Nuclei of an (H, W, 3) uint8 image of any size: the label map and, in
        ``result.instances``, the painted detections as Detectron2 Instances.

        ``channel_order``: "RGB" (PIL, skimage, tifffile) or "BGR" (``cv2.imread``, what
        Detectron2's ``DefaultPredictor`` takes); the model's own ``INPUT.FORMAT`` is handled
        inside, so a BGR array given as RGB would swap haematoxylin and eosin.
        """
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        source = ArraySource(image)  # checks shape and type first (cv2.imread gives None for a missing file)
        if channel_order == "BGR":
            source = ArraySource(source.image[:, :, ::-1])
        return self.predict_source(source, tissue_mask=None, return_instances=True)

    def predict_source(self, source: ImageSource, tissue_mask="auto", desc: Optional[str] = None,
                       return_instances: Optional[bool] = None,
                       label_map_file: Optional[str] = None) -> PredictionResult:
        """Nuclei of the analysed region of an :class:`ImageSource`.

        ``tissue_mask``: "auto" (slides only), True, False/None, or a ready TissueMask; tiles
        without tissue are skipped (they would hold no nuclei).
        ``return_instances``: fill ``result.instances`` (~3 KB per nucleus); default: not for
        slides, where millions of nuclei would make that gigabytes.
        ``label_map_file``: paint the label map into a new memory-mapped ``.npy`` file at this
        path instead of memory (a whole slide at level 0 can need more than the RAM); the
        result's ``label_map`` is then a ``np.memmap`` of it, and the caller removes the file
        once done (see ``nucseg-predict --label-map-ram-gib``).
        """
        if return_instances is None:
            return_instances = not source.is_slide
        if tissue_mask == "auto":
            tissue_mask = source.is_slide
        if tissue_mask is True:
            tissue_mask = source.tissue_mask(margin=self.overlap // 2)
        label_map, scores, instances = self._predict_region(
            source.read, source.height, source.width, tissue_mask or None, desc or source.path,
            return_instances, label_map_file)
        return PredictionResult(label_map=label_map, scores=scores, downsample=float(source.downsample),
                                origin=tuple(int(v) for v in source.origin), mpp=source.mpp,
                                source=source.path, instances=instances)

    # ---------------------------------------------------------------- tiling loop
    def _predict_region(self, read, height, width, tissue_mask, desc, return_instances=False,
                        label_map_file=None):
        timing = {"read": 0.0, "inference": 0.0, "stitch": 0.0, "paint": 0.0}
        tiles = tile_grid(height, width, self.tile_size, self.overlap)
        todo = [t for t in tiles if tissue_mask is None or tissue_mask.has_tissue(t)]
        if not todo and tiles:
            # A pale or faintly stained slide can fall under the saturation threshold whole: say so,
            # rather than return 0 nuclei as if it held none.
            logger.warning("%s: no tissue found in any of its %d tiles, so no nuclei; a pale slide? "
                           "(--tissue-mask off, or tissue_mask=False, analyses every tile)",
                           desc or "image", len(tiles))
        elif len(todo) < len(tiles):
            logger.info("%s: %d of %d tiles hold no tissue and are skipped", desc or "image",
                        len(tiles) - len(todo), len(tiles))
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        store = DetectionStore()

        def read_batch(batch):
            start = time.perf_counter()
            images = [read(t.y0, t.y1, t.x0, t.x1) for t in batch]
            return images, time.perf_counter() - start

        # Reading (decoding slide tiles) overlaps with inference on the previous batch.
        with ThreadPoolExecutor(max_workers=1) as reader, tqdm(
            total=len(todo), unit="tile", desc=os.path.basename(desc) if desc else None,
            disable=not self.progress, leave=False, dynamic_ncols=True,
        ) as bar:
            pending = reader.submit(read_batch, batches[0]) if batches else None
            for index, batch in enumerate(batches):
                images, read_seconds = pending.result()
                timing["read"] += read_seconds
                if index + 1 < len(batches):
                    pending = reader.submit(read_batch, batches[index + 1])
                for tile, dets in zip(batch, self._detect(images, timing)):
                    start = time.perf_counter()
                    store.add(dets, tile)
                    timing["stitch"] += time.perf_counter() - start
                bar.update(len(batch))
        start = time.perf_counter()
        painted = store.paint(height, width, self.max_overlap, return_instances=return_instances,
                              label_map_file=label_map_file)
        label_map, scores = painted[:2]
        instances = painted[2] if return_instances else None
        timing["paint"] = time.perf_counter() - start
        timing.update(tiles=len(tiles), tiles_run=len(todo), detections_kept=len(store),
                      duplicates_removed=store.duplicates_removed)
        self.last_timing = timing
        return label_map, scores, instances

    def _detect(self, images: List[np.ndarray], timing) -> List[TileDetections]:
        """Detections of each tile in its own frame (TTA views merged)."""
        per_view = []
        for name in self.transforms:
            views = [transform_image(image, name) for image in images]
            start = time.perf_counter()
            outputs = self.run_model(views)
            timing["inference"] += time.perf_counter() - start
            start = time.perf_counter()
            detections = []
            for image, view, instances in zip(images, views, outputs):
                dets = detections_from_instances(instances, view.shape[0], view.shape[1],
                                                 self.score_thresh, self.mask_thresh)
                detections.append(invert_detections(dets, name, image.shape[0], image.shape[1]))
            per_view.append(detections)
            timing["stitch"] += time.perf_counter() - start
        if len(per_view) == 1:
            return per_view[0]
        start = time.perf_counter()
        merged = [merge_by_mask_iou(TileDetections.concatenate(views), image.shape[0], image.shape[1])
                  for image, views in zip(images, zip(*per_view))]
        timing["stitch"] += time.perf_counter() - start
        return merged

    @torch.inference_mode()
    def run_model(self, images: List[np.ndarray]):
        """The model's Instances for RGB uint8 tiles, in each tile's pixel frame."""
        inputs = []
        for image in images:
            height, width = image.shape[:2]
            if self.input_format == "BGR":
                image = image[:, :, ::-1]
            if self.resize is not None:
                image = self.resize.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            inputs.append({"image": tensor.to(self.device), "height": height, "width": width})
        return [output["instances"] for output in self.model(inputs)]
