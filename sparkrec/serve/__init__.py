"""`sparkrec serve`: the HTTP API over the published tables, without Spark or a JVM.

    reader   every table read, with delta-rs
    state    the snapshot of a published run, swapped whole when the next one lands
    events   posted events checked and handed to the stream's source
    app      the FastAPI routes, auth, limits and metrics
"""
