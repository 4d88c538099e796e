"""Dataset adapters: each module offers ``add_arguments(parser)`` and ``iter_rows(args) -> Iterator[Row]``."""
