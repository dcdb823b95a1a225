"""Redis and PostgreSQL: key schema and scripts, the script connection, coalescing, the ledger."""
