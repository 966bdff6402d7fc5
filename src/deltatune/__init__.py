"""deltatune: fine-tune pre-trained language models and measure what the fine-tuning changed."""

__version__ = "0.1.0"
