"""One module per pipeline stage: plain functions first, thin @task wrappers that do the I/O."""
