"""dft_ds: Dynamic Fine-Tuning of causal language models on DeepSpeed."""

__version__ = "0.1.0"
