"""The run directory on disk: its layout, file formats and durable writes (docs/design.md, "Run directory").

Nothing here trains or predicts: ``files`` (atomic writes, checksums, the writer lock), ``shardfile`` (the
shard-data format and its columns), ``rundir`` (the layout and typed reads/writes), ``index`` (active records and
tombstones), ``journal`` (the write-ahead log of deletions) and ``checkpoints`` (slice checkpoints).
"""
