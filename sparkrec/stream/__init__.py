"""The live path (`sparkrec stream`): micro-batches into the tables, built on the
batch stages and the storage layer."""
