from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="adamix-ds",
    version="0.1.0",
    description="AdaMix (mixture-of-adaptations) parameter-efficient fine-tuning with DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text() if Path(__file__).with_name("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["adamix_ds", "adamix_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        # 0.19.3: the first release with both frozen-backbone fixes this project needs (bf16 + ZeRO-0 memory, 0.19.2;
        # activation checkpointing with frozen parameters under ZeRO-3, 0.19.3). Tested: 0.19.8.
        "deepspeed>=0.19.3,<0.20",
        # 4.52: transformers.modeling_layers (GradientCheckpointingLayer, read by the planner). Tested: 5.25.
        "transformers>=4.52,<6",
        # The Trainer's launcher and DeepSpeed glue (adamix_ds.trainer, accelerate_configs/). Tested: 1.16.
        "accelerate>=1.0",
        # Model cards, Hub uploads (--push_to_hub) and adapter downloads (load_for_inference). Tested: 2.5.
        "huggingface_hub>=0.24",
        "datasets>=3.0,<6",
        "safetensors>=0.4",
        "numpy>=1.26",
        "scikit-learn>=1.3",
        "scipy>=1.11",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "matplotlib>=3.8",
        # Reads GGUF checkpoints (--model_name_or_path model.gguf; transformers' GGUF loader). Tested: 0.19.0.
        "gguf>=0.10",
        # Generation metrics of the E2E challenge (adamix_ds.data.generation_metrics): BLEU; METEOR 1.5, ROUGE-L and
        # CIDEr-D with the PTB tokenizer (their jars need Java). Tested: sacrebleu 2.6.0, pycocoevalcap 1.2.
        "sacrebleu>=2.3,<3",
        "pycocoevalcap>=1.2",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "peft>=0.13,<0.22", "psutil>=5.9", "ruff>=0.6", "nltk>=3.8", "trl>=1.0"],
        "kernels": ["triton>=3.1"],
        # export_peft / launchers/export.py --format peft write a PEFT LoRA adapter.
        "peft": ["peft>=0.13,<0.22"],
        # adamix_sft_trainer / examples/sft_e2e.py: TRL's SFTTrainer with AdaMix. Tested: 1.16.
        "trl": ["trl>=1.0"],
    },
)
