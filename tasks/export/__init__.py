"""Export: a run (or any filtered set of outputs) to Parquet, chat JSONL and OpenAI batch output files."""
