"""Spark wrappers over the pure-Python core: session, schemas, UDF factories, job, writer."""
