"""NucleiEvaluator: Detectron2 ``DatasetEvaluator`` reporting the nuclei metrics suite."""
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Set

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.readers import load_label_map
from ..modeling.postprocess import instances_to_label_map
from ..predict.writers import write_label_map_image
from .metrics import metric_keys
from .reporting import DEFAULT_METRICS, GROUP_FIELDS, score_image, summarize_scores, write_json_atomic, write_reports

__all__ = ["NucleiEvaluator"]

logger = logging.getLogger(__name__)

# Beside label_maps/: {"label_maps": {data set: [file names its last evaluation wrote]}}.
LABEL_MAP_LISTING_FILE = "label_maps.json"


def _read_label_map_listing(path: str) -> Dict[str, List[str]]:
    """{data set: [file names]} of ``path``; what cannot be read is left out with a warning, and
    the maps it would have named are kept."""
    try:
        with open(path, encoding="utf-8") as stream:
            listing = json.load(stream)["label_maps"]
        if not isinstance(listing, dict):
            raise ValueError("not {data set: [file names]}")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning(f"{path}: unreadable ({err}); earlier label maps are kept")
        return {}
    readable = {name: names for name, names in listing.items()
                if isinstance(names, list) and all(isinstance(n, str) for n in names)}
    if len(readable) < len(listing):
        logger.warning(f"{path}: entries of {sorted(set(listing) - set(readable))} unreadable; their maps are kept")
    return readable


class NucleiEvaluator(DatasetEvaluator):
    """Scores predicted instances against the ground-truth label maps of a registered data set.

    Each image's instances are painted into a label map (``instances_to_label_map``: score
    threshold, descending-score painting, overlap rule) and scored with
    ``nucseg_d2.evaluation.metrics``. Works under distributed evaluation: per-image rows are
    gathered to the main process, which writes ``metrics.json`` (mean, std, per group) and
    ``per_image.csv`` to ``output_dir`` and returns ``{"nuclei": {metric: mean}}``. With
    ``save_label_maps``, the maps go to ``label_maps/`` and their names to ``label_maps.json``
    (per data set); maps an earlier evaluation of the same data set wrote there and this one did
    not (an image since dropped, or a ``.png`` now a ``.tif``) are removed after the reports are
    written, so that re-scoring the folder scores what the report does. Files no evaluation
    listed are left alone.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        metrics: Iterable[str] = DEFAULT_METRICS,
        score_thresh: float = 0.5,
        mask_thresh: float = 0.5,
        max_overlap: float = 0.7,
        save_label_maps: bool = False,
    ):
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.metrics = list(metrics)
        self.score_thresh = score_thresh
        self.mask_thresh = mask_thresh
        self.max_overlap = max_overlap
        self.save_label_maps = save_label_maps
        self._records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
        self._scores = []
        self._written_label_maps = []

    @classmethod
    def from_cfg(cls, cfg, dataset_name: str, output_dir: Optional[str] = None, **kwargs):
        """Build with the post-processing thresholds and metric list of ``cfg.TEST.NUCLEI``."""
        nuclei = cfg.TEST.NUCLEI
        return cls(
            dataset_name,
            output_dir=output_dir,
            metrics=nuclei.METRICS,
            score_thresh=nuclei.SCORE_THRESH,
            mask_thresh=nuclei.MASK_THRESH,
            max_overlap=nuclei.MAX_OVERLAP,
            **kwargs,
        )

    def reset(self):
        self._scores = []
        self._written_label_maps = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            record = self._records[inp["image_id"]]
            gt = load_label_map(record)
            pred = instances_to_label_map(
                out["instances"].to("cpu"),
                score_thresh=self.score_thresh,
                mask_thresh=self.mask_thresh,
                max_overlap=self.max_overlap,
                image_size=gt.shape,
            )
            groups = {key: record[key] for key in GROUP_FIELDS if key in record}
            self._scores.append(score_image(record["image_id"], gt, pred, self.metrics, groups))
            if self.save_label_maps and self.output_dir:
                self._write_label_map(record["image_id"], pred)

    def _write_label_map(self, image_id, label_map):
        """``label_maps/<image id>.png`` (uint16), or ``.tif`` past 65,535 ids."""
        stem = os.path.join(self.output_dir, "label_maps", os.path.basename(str(image_id)))
        self._written_label_maps.append(os.path.basename(write_label_map_image(stem, label_map)))

    def _replace_earlier_label_maps(self, written: Set[str]) -> None:
        """Remove the maps the last evaluation of this data set listed and this one did not write,
        then list this one's. A clean-up that fails warns: the scores are written already."""
        folder = os.path.join(self.output_dir, "label_maps")
        listing_path = os.path.join(self.output_dir, LABEL_MAP_LISTING_FILE)
        listing = _read_label_map_listing(listing_path)
        written_folded = {name.casefold() for name in written}  # one file on a case-insensitive disk
        stale = [name for name in listing.get(self.dataset_name, []) if name.casefold() not in written_folded]
        removed = []
        for name in stale:
            path = os.path.join(folder, os.path.basename(name))
            if not os.path.isfile(path):
                continue
            try:
                os.remove(path)
                removed.append(name)
            except OSError as err:
                logger.warning(f"{path}: an earlier evaluation's label map, not removed ({err})")
        if removed:
            logger.info(f"NucleiEvaluator on {self.dataset_name}: removed {len(removed)} label map(s) an earlier "
                        f"evaluation left in {folder} (e.g. {removed[0]})")
        listing[self.dataset_name] = sorted(written)
        try:
            write_json_atomic(listing_path, {"label_maps": listing})
        except OSError as err:
            logger.warning(f"{listing_path}: not written ({err}); the next evaluation keeps this one's maps")

    def evaluate(self):
        scores, written = self._scores, self._written_label_maps
        if comm.get_world_size() > 1:
            comm.synchronize()
            # Each rank scored its share of the images; the main process reports on all of them.
            gathered = comm.gather((scores, written), dst=0)
            if not comm.is_main_process():
                return {}
            scores = [score for part, _ in gathered for score in part]
            written = [name for _, names in gathered for name in names]
        if not scores:
            logger.warning(f"NucleiEvaluator on {self.dataset_name}: no predictions to score")
            return {}
        metric_names = metric_keys(self.metrics)
        group_key = next((key for key in GROUP_FIELDS if key in scores[0].row), None)
        rows, summary = summarize_scores(scores, metric_names, group_key=group_key)
        summary["dataset"] = self.dataset_name
        summary["postprocess"] = {
            "score_thresh": self.score_thresh,
            "mask_thresh": self.mask_thresh,
            "max_overlap": self.max_overlap,
        }
        if self.output_dir:
            write_reports(self.output_dir, summary, rows)
            if self.save_label_maps:
                self._replace_earlier_label_maps(set(written))
        return OrderedDict({"nuclei": {name: summary["mean"][name] for name in metric_names}})
