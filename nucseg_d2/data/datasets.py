"""Nuclei data sets registered (lazily) in Detectron2's DatasetCatalog and MetadataCatalog.

Registration only binds names to loader functions; a loader touches the disk when the data set is
first requested (``DatasetCatalog.get``). The data root is ``$NUCSEG_DATASETS`` (default
``./datasets``), read at load time, with sub-folders ``tnbc/``, ``kumar/`` and ``cpm17/``.
"""
import csv
import functools
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .readers import LABEL_FORMATS, LABEL_MAP_SUFFIXES, NucleiDataError
from .records import build_records, get_nuclei_cache_dir
from ..utils import files_by_stem, first_few

__all__ = [
    "get_nuclei_data_root",
    "register_nuclei_folder",
    "absolute_nuclei_folders",
    "register_config_datasets",
    "register_tnbc_cross_validation",
    "tnbc_patient_folds",
    "NUCLEI_DATASET_NAMES",
]

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "NUCSEG_DATASETS"
_SPLITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".webp", ".jpg", ".jpeg", ".bmp")

TNBC_SPLITS = ("train", "val", "test")
KUMAR_SPLITS = (
    "train",
    "test_same_organ",
    "test_different_organ",
    "test",
    "train_minus_val",
    "val",
)
SYNTHETIC_SPLITS = {  # split -> (num_images, size, seed)
    "train": (48, (256, 256), 0),
    "val": (8, (256, 256), 1),
}

# Every name this module registers at import (filled in by _register_builtin).
NUCLEI_DATASET_NAMES = []


def unregistered_datasets_message(names):
    """None when every name is a registered data set, else a message naming the unknown ones
    and listing the nuclei data sets (for the caller's own error type)."""
    unknown = [name for name in names if name not in DatasetCatalog]
    if not unknown:
        return None
    noun = "data set" if len(unknown) == 1 else "data sets"
    return f"unknown {noun} {', '.join(map(repr, unknown))}; nuclei data sets: {', '.join(NUCLEI_DATASET_NAMES)}"


def get_nuclei_data_root(dataset_folder=None):
    """``$NUCSEG_DATASETS`` (default ``./datasets``), or its ``dataset_folder`` sub-folder.

    Raises NucleiDataError naming the missing path and the environment variable to set.
    """
    root = os.environ.get(DATA_ROOT_ENV) or "datasets"
    path = root if dataset_folder is None else os.path.join(root, dataset_folder)
    if not os.path.isdir(path):
        what = "data root" if dataset_folder is None else f"'{dataset_folder}' data set folder"
        raise NucleiDataError(
            f"{os.path.abspath(path)}: {what} not found; set the environment variable "
            f"{DATA_ROOT_ENV} to the folder holding tnbc/, kumar/ and cpm17/ (now {root!r})"
        )
    return path


def _metadata(dataset_root, **extra):
    return dict(
        thing_classes=["nucleus"],
        stuff_classes=["background", "nucleus"],
        evaluator_type="nuclei",
        dataset_root=dataset_root,
        **extra,
    )


def _register(name, loader, metadata):
    """Register ``name`` unless already registered (module re-import); never replace a data set."""
    if name in DatasetCatalog:
        existing = DatasetCatalog[name]
        if getattr(getattr(existing, "func", None), "__module__", None) != __name__:
            logger.warning("Data set %r is registered elsewhere; nucseg_d2 leaves it alone", name)
        return False
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    return True


def _update_metadata(name, **values):
    # Values known only at load time (the root is re-read so that NUCSEG_DATASETS set after import
    # applies). Metadata.set refuses to change a value, hence the direct write.
    vars(MetadataCatalog.get(name)).update(values)


def _default_root(dataset_folder):
    # Registration must not touch the disk: the path the loader will use if the env is unchanged.
    return os.path.join(os.environ.get(DATA_ROOT_ENV) or "datasets", dataset_folder)


def _check_files_exist(specs, dataset_name):
    paths = [spec["file_name"] for spec in specs] + [spec["label_file"] for spec in specs]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        shown = first_few(missing, 5)
        raise NucleiDataError(f"{dataset_name}: {len(missing)} file(s) not found: {shown}")


@functools.lru_cache(maxsize=None)
def _read_split_csv(file_name):
    """Rows of a split file shipped with the package (read on first use, not at import)."""
    with open(os.path.join(_SPLITS_DIR, file_name), newline="") as split_file:
        return tuple(csv.DictReader(split_file))


# ----------------------------------------------------------------------------------------- TNBC
def tnbc_patient_folds(num_folds):
    """Split the TNBC patients into ``num_folds`` folds of about equal image count.

    Deterministic: patients in decreasing image count (ties by id) each go to the fold with the
    fewest images so far (ties by fold index). Returns a list of sorted patient-id lists.
    """
    image_counts = {}
    for row in _read_split_csv("tnbc_split.csv"):
        image_counts[row["patient"]] = image_counts.get(row["patient"], 0) + 1
    if not 2 <= num_folds <= len(image_counts):
        raise ValueError(f"num_folds must be in 2..{len(image_counts)}, got {num_folds}")
    folds = [[] for _ in range(num_folds)]
    fold_sizes = [0] * num_folds
    for patient in sorted(image_counts, key=lambda p: (-image_counts[p], p)):
        fold = min(range(num_folds), key=lambda i: (fold_sizes[i], i))
        folds[fold].append(patient)
        fold_sizes[fold] += image_counts[patient]
    return [sorted(fold) for fold in folds]


def _tnbc_patients(split, num_folds=None, fold_index=None):
    """Patients of a TNBC split ("train"/"val"/"test") or of a cross-validation fold's split."""
    if num_folds is None:
        rows = _read_split_csv("tnbc_split.csv")
        return sorted({row["patient"] for row in rows if row["split"] == split})
    folds = tnbc_patient_folds(num_folds)
    if split == "test":
        return folds[fold_index]
    return sorted(p for i, fold in enumerate(folds) if i != fold_index for p in fold)


def _load_tnbc(dataset_name, split, num_folds=None, fold_index=None):
    root = get_nuclei_data_root("tnbc")
    patients = _tnbc_patients(split, num_folds, fold_index)
    _update_metadata(dataset_name, dataset_root=root, patients=patients)
    specs = []
    for row in _read_split_csv("tnbc_split.csv"):
        if row["patient"] not in patients:
            continue
        image_id, patient = row["image"], row["patient"]
        specs.append(
            {
                "file_name": os.path.join(root, f"Slide_{patient}", f"{image_id}.png"),
                "label_file": os.path.join(root, f"GT_{patient}", f"{image_id}.png"),
                "label_format": "tnbc_binary",
                "image_id": image_id,
                "patient": patient,
            }
        )
    _check_files_exist(specs, dataset_name)
    return build_records(specs, dataset_name)


def register_tnbc_cross_validation(num_folds):
    """Register ``tnbc_cv{K}_fold{i}_train`` / ``_test`` (i = 0..K-1) for K = ``num_folds``.

    Folds come from :func:`tnbc_patient_folds`. Returns the registered names.
    """
    tnbc_patient_folds(num_folds)  # checks 2 <= num_folds <= patients now, not when a fold loads
    names = []
    for fold_index in range(num_folds):
        for split in ("train", "test"):
            name = f"tnbc_cv{num_folds}_fold{fold_index}_{split}"
            loader = functools.partial(_load_tnbc, name, split, num_folds, fold_index)
            _register(name, loader, _metadata(_default_root("tnbc")))
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------- Kumar
def _kumar_ids(split):
    """[(image id, organ)] of a Kumar split, in split-file order."""
    rows = _read_split_csv("kumar2017_split.csv")
    organ_of = {row["image_id"]: row["organ_as_labelled_in_Kumar2017"] for row in rows}
    train = [row["image_id"] for row in rows if row["kumar_split"] == "train"]
    # For honest tuning, hold out the first training image of each organ (split-file order).
    first_of_organ = {}
    for image_id in train:
        first_of_organ.setdefault(organ_of[image_id], image_id)
    val = list(first_of_organ.values())
    if split == "val":
        ids = val
    elif split == "train_minus_val":
        ids = [image_id for image_id in train if image_id not in val]
    elif split == "test":
        ids = [row["image_id"] for row in rows if row["kumar_split"].startswith("test_")]
    else:
        ids = [row["image_id"] for row in rows if row["kumar_split"] == split]
    return [(image_id, organ_of[image_id]) for image_id in ids]


# Kumar et al. (2017) split their test set by whether its organs were in the training set.
KUMAR_TEST_SUBSETS = ("test_same_organ", "test_different_organ")


def nuclei_dataset_subsets(dataset_name):
    """Named subsets of a built-in data set's images, ``{subset: [image id]}``, for results
    reported per subset as well as over all images: Kumar's test set is ``test_same_organ``
    (organs seen in training) and ``test_different_organ`` (organs never seen). Empty for data
    sets without such subsets. Read from the shipped split file: needs no image."""
    if dataset_name != "kumar_test":
        return {}
    return {subset: [image_id for image_id, _ in _kumar_ids(subset)] for subset in KUMAR_TEST_SUBSETS}


# Lossless stand-ins for the TIFFs, in order of preference (never a lossy JPEG).
_KUMAR_LOSSLESS_COPIES = (".tiff", ".webp", ".png")


def _kumar_image_file(root, image_id):
    """The original ``images/<id>.tif``, else a losslessly re-encoded copy of it (e.g. ``.webp``).

    The copies exist because the 30 LZW TIFFs (67 MB) do not fit the 64 MiB a GPU device command
    carries, while lossless WebP (41 MB) does; see scripts/prepare_device_data.py.
    """
    original = os.path.join(root, "images", f"{image_id}.tif")
    if os.path.isfile(original):
        return original
    for suffix in _KUMAR_LOSSLESS_COPIES:
        candidate = os.path.join(root, "images", image_id + suffix)
        if os.path.isfile(candidate):
            return candidate
    return original  # reported as missing by _check_files_exist


def _load_kumar(dataset_name, split):
    root = get_nuclei_data_root("kumar")
    _update_metadata(dataset_name, dataset_root=root)
    specs = []
    for image_id, organ in _kumar_ids(split):
        label_png = os.path.join(root, "labels", f"{image_id}.png")
        label_xml = os.path.join(root, "xml", f"{image_id}.xml")
        # Prefer the rasterised label maps; the original polygons are the fallback.
        if os.path.isfile(label_png) or not os.path.isfile(label_xml):
            label_file, label_format = label_png, "label_map"
        else:
            label_file, label_format = label_xml, "monuseg_xml"
        specs.append(
            {
                "file_name": _kumar_image_file(root, image_id),
                "label_file": label_file,
                "label_format": label_format,
                "image_id": image_id,
                "organ": organ,
            }
        )
    _check_files_exist(specs, dataset_name)
    return build_records(specs, dataset_name)


# ------------------------------------------------------------------------------- user folders
def _pair_by_stem(image_dir, label_dir, label_suffixes, dataset_name):
    """[(image path, label path)] matched by file stem, sorted by stem."""
    def by_stem(folder, suffixes):
        if not os.path.isdir(folder):
            raise NucleiDataError(f"{folder}: folder not found (data set {dataset_name})")
        try:
            return files_by_stem(folder, suffixes)
        except ValueError as e:
            raise NucleiDataError(str(e)) from None

    images = by_stem(image_dir, _IMAGE_SUFFIXES)
    labels = by_stem(label_dir, label_suffixes)
    if not images:
        suffixes = ", ".join(_IMAGE_SUFFIXES)
        raise NucleiDataError(f"{image_dir}: no images ({suffixes}) for data set {dataset_name}")
    unlabelled = sorted(os.path.basename(images[stem]) for stem in images if stem not in labels)
    if unlabelled:
        raise NucleiDataError(
            f"{image_dir}: {len(unlabelled)} image(s) without a label ({', '.join(label_suffixes)}) in {label_dir}: "
            f"{first_few(unlabelled, 10)}"
        )
    # Dropping these would shrink a training or test set unnoticed.
    orphans = sorted(os.path.basename(labels[stem]) for stem in labels if stem not in images)
    if orphans:
        raise NucleiDataError(
            f"{label_dir}: {len(orphans)} label(s) without an image ({', '.join(_IMAGE_SUFFIXES)}) in "
            f"{image_dir}: {first_few(orphans, 10)}"
        )
    return [(images[stem], labels[stem]) for stem in sorted(images)]


def _folder_specs(pairs, label_format):
    return [
        {
            "file_name": image_path,
            "label_file": label_path,
            "label_format": label_format,
            "image_id": os.path.splitext(os.path.basename(image_path))[0],
        }
        for image_path, label_path in pairs
    ]


# The files each label format reads, so that a label file of another kind is named as such.
_LABEL_SUFFIXES_OF_FORMAT = {"label_map": LABEL_MAP_SUFFIXES, "tnbc_binary": (".png", ".tif", ".tiff"),
                             "monuseg_xml": (".xml",), "cpm17_mat": (".mat",)}


def _load_folder(dataset_name, image_dir, label_dir, label_format):
    label_suffixes = _LABEL_SUFFIXES_OF_FORMAT[label_format]
    pairs = _pair_by_stem(image_dir, label_dir, label_suffixes, dataset_name)
    return build_records(_folder_specs(pairs, label_format), dataset_name)


_FOLDER_REGISTRATIONS = {}  # name -> (image_dir, label_dir, label_format)


def register_nuclei_folder(name, image_dir, label_dir, label_format="label_map"):
    """Register a user data set: ``image_dir`` images paired by file stem with ``label_dir`` labels.

    Labels are PNG/TIFF/.npy/.mat label maps (or TNBC-style binary PNG/TIFF masks with label_format
    "tnbc_binary", Aperio XML with "monuseg_xml", CPM-17 .mat with "cpm17_mat"); an image without a
    label, or a label without an image, is a NucleiDataError when the set is first read.
    Registering the same name with the same arguments again is a no-op; with other arguments, or a
    name taken by another data set, an error.
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    arguments = (os.fspath(image_dir), os.fspath(label_dir), label_format)
    if name in DatasetCatalog:
        if _FOLDER_REGISTRATIONS.get(name) == arguments:
            return
        raise ValueError(f"Data set {name!r} is already registered; pick another name")
    loader = functools.partial(_load_folder, name, *arguments)
    root = os.path.commonpath([os.path.abspath(arguments[0]), os.path.abspath(arguments[1])])
    _register(name, loader, _metadata(root))
    _FOLDER_REGISTRATIONS[name] = arguments


def absolute_nuclei_folders(folders):
    """``DATASETS.NUCLEI_FOLDERS`` entries with their folders made absolute (``~`` expanded,
    relative to the working directory), so that a run's saved config finds them from anywhere."""
    def absolute(folder):
        return os.path.abspath(os.path.expanduser(folder))

    return [[name, absolute(image_dir), absolute(label_dir), *label_format]
            for name, image_dir, label_dir, *label_format in folders]


def register_config_datasets(cfg):
    """Register the data sets a config names beyond the built-in ones: the TNBC folds for
    ``DATASETS.TNBC_NUM_FOLDS`` and each ``DATASETS.NUCLEI_FOLDERS`` entry [name, image_dir,
    label_dir(, label_format)] (see :func:`register_nuclei_folder`; relative folders are read from
    the working directory). A folder that does not exist is reported now, not when the data set is
    first read (train_net.py reads DATASETS.TRAIN and DATASETS.TEST before training). Safe to call
    again with the same config.
    Returns the folder names."""
    register_tnbc_cross_validation(cfg.DATASETS.TNBC_NUM_FOLDS)
    names = []
    entries = absolute_nuclei_folders(cfg.DATASETS.NUCLEI_FOLDERS)
    for index, (name, image_dir, label_dir, *label_format) in enumerate(entries):
        where = f"DATASETS.NUCLEI_FOLDERS[{index}] {name!r}"
        for folder in (image_dir, label_dir):
            if not os.path.isdir(folder):
                raise NucleiDataError(f"{where}: {folder}: folder not found")
        try:
            register_nuclei_folder(name, image_dir, label_dir, *label_format)
        except ValueError as err:
            raise NucleiDataError(f"{where}: {err}") from err
        names.append(name)
    return names


# --------------------------------------------------------------------------------------- CPM-17
def _load_cpm17(dataset_name, split):
    root = get_nuclei_data_root("cpm17")
    _update_metadata(dataset_name, dataset_root=root)
    split_dir = os.path.join(root, split)
    image_dir, label_dir = os.path.join(split_dir, "Images"), os.path.join(split_dir, "Labels")
    pairs = _pair_by_stem(image_dir, label_dir, (".mat",), dataset_name)
    return build_records(_folder_specs(pairs, "cpm17_mat"), dataset_name)


# ------------------------------------------------------------------------------------ synthetic
def _load_synthetic(dataset_name, split):
    from .synthetic import ensure_synthetic_split  # imported here: only needed when requested

    num_images, size, seed = SYNTHETIC_SPLITS[split]
    cache_dir = os.path.join(get_nuclei_cache_dir(), "synthetic")
    _update_metadata(dataset_name, dataset_root=cache_dir)
    pairs = ensure_synthetic_split(cache_dir, split, num_images, size, seed)
    return build_records(_folder_specs(pairs, "label_map"), dataset_name)


# --------------------------------------------------------------------------------- registration
def _register_builtin():
    names = []
    for folder, loader, splits in (
        ("tnbc", _load_tnbc, TNBC_SPLITS),
        ("kumar", _load_kumar, KUMAR_SPLITS),
        ("cpm17", _load_cpm17, ("train", "test")),
    ):
        for split in splits:
            name = f"{folder}_{split}"
            loader_of_split = functools.partial(loader, name, split)
            _register(name, loader_of_split, _metadata(_default_root(folder)))
            names.append(name)
    names += register_tnbc_cross_validation(5)
    for split in SYNTHETIC_SPLITS:
        name = f"nuclei_synthetic_{split}"
        synthetic_dir = os.path.join(get_nuclei_cache_dir(), "synthetic")
        _register(name, functools.partial(_load_synthetic, name, split), _metadata(synthetic_dir))
        names.append(name)
    NUCLEI_DATASET_NAMES[:] = names


_register_builtin()
