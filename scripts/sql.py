"""Run SQL against the results file (read-only) and print the result as a table.

    python scripts/sql.py "SELECT * FROM run_summary"
    python scripts/sql.py --db other.duckdb "SELECT count(*) FROM outputs"
"""

from __future__ import annotations

import argparse

import duckdb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query")
    parser.add_argument("--db", default="results/results.duckdb")
    parser.add_argument("--max-rows", type=int, default=50)
    args = parser.parse_args()
    with duckdb.connect(args.db, read_only=True) as con:
        table = con.sql(args.query).to_arrow_table()
    frame = table.slice(0, args.max_rows).to_pandas()
    print(frame.to_string(index=False, max_colwidth=60))
    if table.num_rows > args.max_rows:
        print(f"... {table.num_rows - args.max_rows} more rows")


if __name__ == "__main__":
    main()
