"""Command-line entry points, the top floor: every ``unimlip-*`` console script is a thin module here that parses
its arguments and makes one call into the packages below (``python -m unimlip_train.cli.NAME`` runs the same).

train, demo, export, eval, finetune, fetch_weights, ablate, submit, shard; ``args`` holds the shared
``key.sub=value`` override parsing. Nothing below this package imports it.
"""
