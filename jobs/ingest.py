"""spark-submit entry point: `spark-submit jobs/ingest.py --config conf/cluster.yaml [--set key=value ...]`."""

import sys

from sparkrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
