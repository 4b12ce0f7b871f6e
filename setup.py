"""Build script for mgs_kernels.

The Python package always installs. Native extensions (csrc/ + python_api/) are added by the
native-kernels work; see README "Install".
"""

from setuptools import find_packages, setup

setup(
    name="mgs_kernels",
    version="0.1.0",
    description="Fast, exact Modular Gradient Surgery (per-module PCGrad) kernels for multi-task LLM training",
    packages=find_packages(include=["mgs_kernels", "mgs_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "transformers>=4.40"],
        "plot": ["matplotlib"],
    },
)
