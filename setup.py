from setuptools import find_packages, setup

setup(
    name="megatron-usp",
    version="0.1.0",
    description="Unified Sequence Parallelism (Ulysses x Ring attention) for Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_usp", "megatron_usp.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.3"],
    extras_require={
        "megatron": ["megatron-core>=0.13", "einops", "psutil"],
        "test": ["pytest>=7", "pytest-timeout>=2"],
        "demo": ["matplotlib>=3.5"],
    },
)
