"""Print the schema the migrations build: `python -m tasks.store.migrations > tasks/store/schema.sql`."""

import duckdb

from tasks.store.migrations import migrate, schema_sql

with duckdb.connect() as memory:
    migrate(memory)
    print(schema_sql(memory), end="")
