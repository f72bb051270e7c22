"""Package metadata for nucseg-d2. Torch and detectron2 are installed by scripts/setup_venv.sh."""
from setuptools import find_packages, setup

setup(
    name="nucseg-d2",
    version="0.1.0",
    description="Panoptic nuclei instance segmentation for H&E histopathology on Detectron2",
    license="Apache-2.0",
    packages=find_packages(include=["nucseg_d2", "nucseg_d2.*"]),
    package_data={"nucseg_d2": ["data/splits/*.csv"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "scipy",
        "scikit-image",
        "opencv-python-headless",
        "pycocotools",
        "fvcore",
        "tifffile>=2024.1.30",
        "imagecodecs",
        "Pillow",
    ],
    entry_points={
        "console_scripts": [
            "nucseg-eval=nucseg_d2.evaluation.folder_eval:main",
            "nucseg-significance=nucseg_d2.evaluation.significance:main",
            "nucseg-predict=nucseg_d2.predict.cli:main",
        ]
    },
)
