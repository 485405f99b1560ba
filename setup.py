from setuptools import find_packages, setup

setup(
    name="hf-hetermoe",
    version="0.1.0",
    description=(
        "HeterMoE for Hugging Face: train Mixture-of-Experts models on clusters that mix GPU generations "
        "(attention on new GPUs, experts on old ones, zebra parallelism, Asym-EA)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_hetermoe", "hf_hetermoe.*", "model_patches", "model_patches.*"]),
    package_data={"hf_hetermoe": ["data/*.txt", "data/*.md", "recipes/*.yaml", "recipes/*.py"]},
    include_package_data=True,
    install_requires=[
        # torch is required, but .ci/run installs the CPU build (torch==2.13.0) first when torch is missing:
        # a loose requirement with torch absent would pull a multi-GB CUDA build.
        "torch>=2.6",
        "transformers>=5,<6",
        "accelerate>=1.10",
        "datasets",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "numpy",  # the transport builds holder expert ids with numpy (cheaper than torch on CPU tensors)
        # `hetermoe plan` solves the lower bound and calibration with scipy and draws its Gantt chart with matplotlib.
        "scipy",
        "matplotlib",
    ],
    extras_require={
        # trl, peft and tensorboard: the fine-tuning golden tests (SFTTrainer, LoRA, report_to="tensorboard").
        "test": ["pytest", "hypothesis", "trl>=1.16", "peft>=0.21", "tensorboard"],
    },
    entry_points={"console_scripts": ["hetermoe=hf_hetermoe.cli:main"]},
)
