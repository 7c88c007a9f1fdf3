"""Build and install megatron-moma.

Install torch first (the CPU or CUDA build you want), then:
    pip install --no-build-isolation -e ".[dev]"
"""

from setuptools import find_packages, setup

setup(
    name="megatron-moma",
    version="0.1.0",
    description=(
        "Megatron-Core plugin for mixed-modal early-fusion pretraining with modality-aware "
        "sparsity: MoMa, Mixture-of-Transformers and Mixture-of-Depths"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_moma", "megatron_moma.*"]),
    install_requires=[
        # A range, not a pin: an installed torch 2.4+ (CPU or CUDA) is used as it is.
        "torch>=2.4",
        # Pinned exactly: megatron_moma.platform patches its internals (DESIGN.md).
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        # dist_checkpointing's filesystem writer needs it without declaring it.
        "psutil",
        "safetensors",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "hf": ["transformers>=4.45"],
        "te": ["transformer-engine[pytorch]"],
        # The sample corpus reads scikit-learn's bundled digits (no download).
        "data": ["scikit-learn"],
        "dev": ["pytest>=8", "pytest-timeout", "scikit-learn", "transformers>=4.45"],
    },
    entry_points={
        "console_scripts": [
            "moma-preprocess=megatron_moma.data.preprocess:main",
            "moma-sample-data=megatron_moma.data.sample_corpus:main",
            "pretrain-moma=megatron_moma.training.pretrain_moma:main",
            "moma-upcycle=megatron_moma.training.upcycling:main",
        ],
    },
)
