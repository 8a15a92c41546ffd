"""spark-submit entry point: `spark-submit jobs/run.py --config conf/cluster.yaml [--set key=value ...]`."""

import sys

from sparkrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
