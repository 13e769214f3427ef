"""memdiff: train conditional diffusion models on chest X-rays and audit them for memorization.

torch/torchvision are pinned and installed first by the Makefile (they come from the local wheel
store); deepspeed is installed afterwards with --no-build-isolation because its build imports torch.
"""
from setuptools import find_packages, setup

setup(
    name="memdiff",
    version="0.1.0",
    description="Conditional chest X-ray diffusion with memorization detection, validation and mitigation",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "data_pipeline", "data_pipeline.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "click",
        "triton",
        "pillow",
        "safetensors",
        "scipy",
        "scikit-learn",
        "scikit-image",
        "matplotlib",
        "pyarrow",
        "tqdm",
        "tensorboard",
        "opacus",
        "open-clip-torch",
        "nvidia-dali-cuda130",
    ],
    extras_require={
        # diffusers: tests/test_ddim_diffusers.py checks memdiff's DDIM step by step against DDIMScheduler
        "dev": ["pytest", "pytest-benchmark", "diffusers>=0.42"],
        # bench/peers.py: what users would pick instead (Opacus is already a main dependency)
        "bench": ["diffusers>=0.42"],
        "xformers": ["xformers==0.0.35"],
    },
)
