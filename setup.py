"""Build script for rlora_kernels: the Python package and, where a compiler exists, rlora_kernels._C."""

from setuptools import find_packages, setup

setup(
    name="rlora_kernels",
    version="0.1.0",
    description="Kernels and optimizers for Riemannian LoRA on the fixed-rank manifold",
    packages=find_packages(include=["rlora_kernels", "rlora_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton>=3.8"],
        "peft": ["peft"],
        "finetune": ["transformers", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "peft", "transformers", "matplotlib"],
    },
    entry_points={"console_scripts": ["rlora=rlora_kernels.cli.main:main"]},
)
