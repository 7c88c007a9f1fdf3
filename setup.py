"""Build and install megatron-moma.

Install torch first (the CPU or CUDA build you want), then:
    pip install --no-build-isolation -e ".[dev]"
"""

from setuptools import find_packages, setup


def csrc_extensions():
    """The csrc extension `megatron_moma._csrc`: C++ CPU kernels always, CUDA kernels (sm_80 and
    sm_90) too where torch is a CUDA build and a CUDA toolkit is found. Without torch at build
    time nothing is built and megatron_moma uses its pure-torch fallback."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    sources = ["csrc/bindings.cpp", "csrc/dispatch_cpu.cpp"]
    # torch runs its CPU ops on OpenMP; at::parallel_for only goes parallel if we compile with it.
    cxx_flags, link_flags = ["-O3", "-fopenmp"], ["-fopenmp"]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        extension = CUDAExtension(
            "megatron_moma._csrc",
            sources + ["csrc/dispatch_cuda.cpp", "csrc/dispatch_cuda_kernels.cu"],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-gencode=arch=compute_80,code=sm_80",
                         "-gencode=arch=compute_90,code=sm_90"],
            },
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension("megatron_moma._csrc", sources,
                                 extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = csrc_extensions()

# The exported model's KV cache uses the per-layer Cache API of transformers 4.56. CI runs the
# Hugging Face tests against this lowest version as well as the newest one pip resolves.
TRANSFORMERS = "transformers>=4.56"

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
        # Pinned exactly: megatron_moma.platform patches its internals (docs/cpu.md).
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
        "hf": [TRANSFORMERS],
        "te": ["transformer-engine[pytorch]"],
        # The digits corpus reads scikit-learn's bundled digits (no download); the real corpus
        # and moma-tokenize-images read and write PNGs with Pillow.
        "data": ["scikit-learn", "Pillow"],
        # benchmarks/reproduce_flops_savings.py draws its loss-vs-FLOPs curves with it.
        "bench": ["matplotlib", "scikit-learn"],
        "dev": ["pytest>=8", "pytest-timeout", "scikit-learn", TRANSFORMERS, "matplotlib",
                "Pillow"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "moma-preprocess=megatron_moma.data.preprocess:main",
            "moma-sample-data=megatron_moma.data.sample_corpus:main",
            "moma-tokenize-images=megatron_moma.data.tokenize_images:main",
            "pretrain-moma=megatron_moma.training.pretrain_moma:main",
            "moma-upcycle=megatron_moma.training.upcycling:main",
            "moma-convert=megatron_moma.conversion.cli:main",
        ],
    },
)
