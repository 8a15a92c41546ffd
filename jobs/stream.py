"""spark-submit entry point of the live path, a long-running job beside the daily batch:

    spark-submit --packages io.delta:delta-spark_4.2_2.13:4.4.0,org.apache.spark:spark-sql-kafka-0-10_2.13:4.2.0 \
        jobs/stream.py --config conf/cluster.yaml [--once] [--set key=value ...]
"""

import sys

from sparkrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["stream", *sys.argv[1:]]))
