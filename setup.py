"""Packaging for the GRPO-for-vision-language-models library (PathVLM-R1 reproduction).

Four import packages live at the top of the repository: ``grpo`` (algorithm and trainer),
``rewards`` (reward modules and the LLM-judge client/server), ``models`` (loading, tiny offline
Qwen2.5-VL) and ``data`` (VQA records, loaders, prompts, the embedded dataset).
Exact pins for the tested stack are in requirements.txt; these ranges are what the code needs.
"""
from setuptools import find_packages, setup

setup(
    name="grpo-vlm",
    version="0.1.0",
    description="GRPO for vision-language models with LLM-judge process rewards (PathVLM-R1)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["grpo", "grpo.*", "rewards", "rewards.*", "models", "models.*",
                                    "data", "data.*"]),
    include_package_data=True,
    package_data={"rewards": ["judge/prompts/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "accelerate>=1.0",
        "deepspeed>=0.16",
        "safetensors",
        "numpy>=1.26",
        "pillow>=10",
        "einops>=0.8",
        "httpx>=0.27",
        "sniffio>=1.3",
        "tqdm>=4.66",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "dev": ["pytest>=8", "hypothesis>=6.100"],
        # Parquet files (Hugging Face copies of PathVQA, VQA-RAD) and datasets.Dataset objects;
        # data/ reads Parquet through pyarrow and never imports datasets itself.
        "data": ["pyarrow>=15", "datasets>=2.19"],
        # LoRA adapters (peft_config= on GRPOTrainer / SFTTrainer; models/lora.py imports peft).
        "lora": ["peft>=0.21"],
        # Plots of the PathVLM-R1 report (examples/pathvlm_r1.py).
        "report": ["matplotlib>=3.8"],
        # report_to="tensorboard" / "wandb" (grpo/reporting.py imports them only when chosen).
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.20"],
        # Baselines used only by bench/ (never imported by the library itself).
        "bench": ["trl>=0.20"],
    },
)
