"""The core: what every layer shares, with no Spark and no JVM.

Configuration schema, column and table names, errors, the stage table, and the
kernels (top-k and fill, the per-block list builder, fold-in, metrics, the
ledger's arithmetic, the gate's verdict, pseudonyms). The batch, the stream and
a server call these same functions; import-linter keeps pyspark out of here.
Kept empty so that importing one kernel imports only that kernel.
"""
