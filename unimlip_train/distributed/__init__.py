"""Process groups and the few collectives the rest of the project shares (``process_group``): set up from whatever
launched the job (torchrun, the ``deepspeed`` launcher, SLURM, or nothing), and agreed decisions across ranks."""
