"""The ablation table: train each objective config (one after another or as a SLURM array), evaluate every
checkpoint the same way, and tabulate the metrics next to the CLIP-only row (``unimlip-ablate``).

``plan`` turns configs x seeds into run directories and knows when one is finished; ``evaluate`` scores a
checkpoint (retrieval, zero-shot, linear probe) and caches the result beside it; ``table`` builds the rows,
the per-config means and the markdown; ``runner`` trains and evaluates one run here and writes the table.
The command line is ``unimlip_train.cli.ablate``; the SLURM array and its task (``AblationJob``) are in
``launch.ablation`` and ``launch.jobs``.
"""
