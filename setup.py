"""nemo-dmc: Dynamic Memory Compression for NeMo / megatron-core decoder LLMs."""

from setuptools import find_packages, setup

setup(
    name="nemo-dmc",
    version="0.1.0",
    description="Dynamic Memory Compression (DMC) retrofitting for megatron-core / NeMo LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    # The Triton kernels live in kernels/ (the product's layout) and install as nemo_dmc.kernels.
    packages=find_packages(include=["nemo_dmc", "nemo_dmc.*"]) + ["nemo_dmc.kernels"],
    package_dir={"nemo_dmc.kernels": "kernels"},
    # lm-eval task files of nemo_dmc.evaluate (offline demo tasks).
    package_data={"nemo_dmc.evaluate": ["tasks/*.yaml", "tasks/*.py", "tasks/data/*.jsonl"]},
    # Pinned, tested versions. torch must be the CPU or CUDA build matching your machine:
    # install with `pip install -c constraints.txt ...` so pip never swaps it.
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.15.3",  # what nemo_toolkit[llm] 2.7.x expects; last series for py3.11
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "triton==3.7.1",
        "numpy<2",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "psutil>=5.9",  # imported by megatron's dist_checkpointing, not declared by it
        "tokenizers==0.22.2",
        "transformers==4.57.6",  # what nemo_toolkit[llm] 2.7.x accepts (~=4.57.0)
        "gguf==0.19.0",  # transformers' GGUF loader (tokenizers and weights from .gguf files)
        "accelerate==1.15.0",  # required by transformers to load GGUF weights
        "pyyaml>=6",
        "hydra-submitit-launcher==1.2.0",  # hydra/launcher=submitit_slurm|submitit_local
    ],
    extras_require={
        "test": ["pytest>=8"],
        # NeMo 2 model classes, NeMo checkpoints and NeMo-Run recipes. NeMo imports nemo_run
        # without declaring it; leptonai 0.47 lacks leptonai.api.v1; pyarrow>=22 needs numpy 2.
        "nemo": ["nemo_toolkit[llm]==2.7.3", "nemo_run", "leptonai<0.47", "pyarrow<22"],
        # python -m nemo_dmc.evaluate's heatmap and the lm-evaluation-harness model type
        # (nemo_dmc.evaluate.lm_eval_adapter); lm_eval 0.4.9 keeps every pin above.
        "eval": ["lm_eval==0.4.9", "matplotlib>=3.7"],
    },
)
