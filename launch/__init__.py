"""Submitit launchers for SLURM (and the same jobs locally), plus a one-node SLURM for tests."""
