"""The embedded store: connections and HTTP transactions in a local SQLite file, written by
a pipeline sink, read by `flowtap query` and `flowtap export` while the sensor runs."""
