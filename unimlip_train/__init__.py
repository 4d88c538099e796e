"""unimlip: a distributed training system for Uni-Mlip medical vision-language pre-training."""

__version__ = "0.1.0"
