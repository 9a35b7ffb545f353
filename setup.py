"""clcl_det: continual (class-incremental) object detection with CLIP, detectron2-style."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="clcl_det",
    version="0.1.0",
    description="Continual object detection with CLIP (CL-CLIP, F-ViT, SPA, SECA), detectron2-style",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["clcl_det", "clcl_det.*"]),
    package_data={"clcl_det": ["modeling/clip/model_configs/*.json", "embedded/assets/shapes-tiny.pt",
                                "embedded/assets/clutter-tiny.pt"]},
    data_files=[("share/clcl_det/descriptions", sorted(str(p) for p in Path("datasets/descriptions").glob("*.json")))],
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5",
        "open_clip_torch>=2.24",
        "timm>=1.0",  # EVA02-CLIP towers (open_clip builds them on timm's Eva; the dense encoder uses timm.layers)
        "pot>=0.9.4",
        "pycocotools>=2.0.6",
        "numpy>=1.23",
        "Pillow>=9.0",
        "PyYAML>=6.0",
        "tabulate>=0.9",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "tensorboard>=2.10",
    ],
    extras_require={"dev": ["pytest>=7.0"]},
)
