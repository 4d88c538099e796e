"""Evaluation: retrieval, zero-shot classification and linear probes on frozen embeddings.

``validate.validate_with_examples`` is what ``unimlip-train`` and the SLURM job hand the trainer for its periodic ``val/``
scalars (the engine never imports this package): every rank calls it, every rank gets the same dict
(embeddings are gathered everywhere, metrics computed identically on each rank). ``run`` is ``unimlip-eval``'s
work once its arguments are parsed; ``card`` the provenance card every result carries.
"""
