"""The DuckDB results store: the only code that opens the results file or runs SQL against its tables.

`connection` opens it (readers read-only, writers through one transaction helper, both waiting
while another process holds the file), `migrations` builds its schema, `commit` writes, and
`queries`, `curation` and `exports` are the named reads and writes the other subsystems use.
"""
