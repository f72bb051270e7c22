"""NucleiEvaluator: Detectron2 ``DatasetEvaluator`` reporting the nuclei metrics suite."""
import csv
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Iterable, Optional

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from PIL import Image

from ..data.readers import load_label_map
from ..modeling.postprocess import instances_to_label_map, label_map_dtype
from .metrics import aji_counts, compute_metrics, summarize

__all__ = ["NucleiEvaluator"]

logger = logging.getLogger(__name__)

# Record fields copied into each per-image row so results can be grouped (per organ, patient).
_GROUP_FIELDS = ("organ", "patient")


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class NucleiEvaluator(DatasetEvaluator):
    """Scores predicted instances against the ground-truth label maps of a registered data set.

    Each image's instances are painted into a label map (``instances_to_label_map``: score
    threshold, descending-score painting, overlap rule) and scored with
    ``nucseg_d2.evaluation.metrics``. Works under distributed evaluation: per-image rows are
    gathered to the main process, which writes ``metrics.json`` (mean, std, per group) and
    ``per_image.csv`` to ``output_dir`` and returns ``{"nuclei": {metric: mean}}``.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        metrics: Iterable[str] = ("aji", "aji_plus", "paper_aji", "dice1", "pq"),
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
        self._rows = []

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
        self._rows = []

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
            row = {"image_id": record["image_id"]}
            row.update({k: record[k] for k in _GROUP_FIELDS if k in record})
            row["num_gt"] = int(len(np.unique(gt)) - (gt.min() == 0))
            row["num_pred"] = int(pred.max())
            row.update(compute_metrics(gt, pred, self.metrics))
            # Pooled ("aggregated over all images") AJI needs the raw sums, not the ratio.
            intersection, union = aji_counts(gt, pred, variant="aji")
            self._rows.append((row, intersection, union))
            if self.save_label_maps and self.output_dir:
                self._write_label_map(record["image_id"], pred)

    def _write_label_map(self, image_id, label_map):
        folder = os.path.join(self.output_dir, "label_maps")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{os.path.basename(str(image_id))}.png")
        tmp = path + ".tmp.png"
        Image.fromarray(label_map.astype(label_map_dtype(int(label_map.max())))).save(tmp)
        os.replace(tmp, path)

    def evaluate(self):
        scored = self._rows
        if comm.get_world_size() > 1:
            comm.synchronize()
            scored = [r for part in comm.gather(scored, dst=0) for r in part]
            if not comm.is_main_process():
                return {}
        if not scored:
            logger.warning(f"NucleiEvaluator on {self.dataset_name}: no predictions to score")
            return {}
        rows = [row for row, _, _ in scored]
        total_union = sum(union for _, _, union in scored)
        pooled_aji = sum(inter for _, inter, _ in scored) / total_union if total_union else 1.0
        rows.sort(key=lambda r: str(r["image_id"]))
        metric_names = [k for k in rows[0] if k not in ("image_id", "num_gt", "num_pred", *_GROUP_FIELDS)]
        group_key = next((k for k in _GROUP_FIELDS if k in rows[0]), None)
        summary = summarize(rows, metric_names, group_key=group_key)
        summary["dataset"] = self.dataset_name
        summary["num_images"] = len(rows)
        summary["pooled_aji"] = pooled_aji
        summary["postprocess"] = {
            "score_thresh": self.score_thresh,
            "mask_thresh": self.mask_thresh,
            "max_overlap": self.max_overlap,
        }
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            self._write_json(os.path.join(self.output_dir, "metrics.json"), summary)
            self._write_csv(os.path.join(self.output_dir, "per_image.csv"), rows)
        return OrderedDict({"nuclei": {name: summary["mean"][name] for name in metric_names}})

    @staticmethod
    def _write_json(path, obj):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            # Strict JSON: NaN (std of one image) and inf (Hausdorff vs an empty map) become null.
            json.dump(_json_safe(obj), f, indent=2, allow_nan=False)
        os.replace(tmp, path)

    @staticmethod
    def _write_csv(path, rows):
        fields = list(rows[0])
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
