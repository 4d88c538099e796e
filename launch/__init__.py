"""Submitit launchers for SLURM (and the same jobs locally), plus a local N-node SLURM for tests
(``local_cluster.sh``).

``jobs`` (what runs inside a job: TrainJob, EvalJob, AblationJob), ``submit`` and ``status`` (the work of
``unimlip-submit``), ``pending`` (why a queued job waits), ``ablation`` (``unimlip-ablate``: local runs or one job
array), ``sharding`` (``unimlip-shard`` as an array plus a merge job), ``options`` (the SLURM options the commands
share), ``runs`` (a run dir's config claim and submission records), ``slurm`` (executors, sbatch scripts, sacct
states).
The command lines themselves are in ``unimlip_train.cli``, which launch never imports.
"""
