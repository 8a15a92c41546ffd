"""Storage and the run record: the SparkSession, every Delta read and write, raw
files in, and the `runs` registry. The only layer that touches table IO."""
