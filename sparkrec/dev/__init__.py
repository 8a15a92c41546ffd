"""Development services: a local Kafka broker, a localhost Spark cluster and the
generated shop. Imported only by the CLI, tests and benchmarks."""
