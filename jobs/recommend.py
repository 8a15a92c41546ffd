"""spark-submit entry point: `spark-submit jobs/recommend.py --config conf/cluster.yaml [--set key=value ...]`."""

import sys

from sparkrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["recommend", *sys.argv[1:]]))
