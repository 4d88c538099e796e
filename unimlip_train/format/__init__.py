"""What the shard writer (``data_prep``) and training both read and write: the bottom floor of the project.

Report normalisation and ``report_id`` (``report_text``), manifest rows and view rules (``rows``), the
group-split rule (``splits``), shard names, sample keys, file hashes and the sample json (``shards``). Kept
to the standard library so the loader's worker processes import it cheaply, and so that neither side has to
import the other to agree on a format.
"""
