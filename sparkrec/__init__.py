"""sparkrec: a recommendation pipeline for e-commerce on Apache Spark and Delta Lake."""

__version__ = "0.1.0"
