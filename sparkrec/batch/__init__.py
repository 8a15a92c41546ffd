"""The Spark batch stages: DataFrame -> DataFrame transforms (ingest, clean,
incremental, ids, train, evaluate, tune, recommend, forget) and `pipeline`,
which puts them in order through the storage layer."""
