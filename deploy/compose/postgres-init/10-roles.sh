#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data directory: the two roles of
# causal-commit. The owner role owns the database and runs `causal-commit migrate` (DDL); the
# runtime role used by the processors may only read and write rows in what the owner creates.
# The same statements, with real passwords, provision a managed PostgreSQL.
set -euo pipefail
owner_password=$(< /run/secrets/postgres-owner-password)
app_password=$(< /run/secrets/postgres-app-password)
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v owner_password="$owner_password" -v app_password="$app_password" <<'SQL'
CREATE ROLE causal_commit_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE causal_commit_app LOGIN PASSWORD :'app_password';
ALTER DATABASE causal_commit OWNER TO causal_commit_owner;
REVOKE ALL ON DATABASE causal_commit FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE causal_commit TO causal_commit_app;
-- Whatever the owner creates later (the schema, its tables and sequences) is usable, not
-- alterable, by the runtime role.
ALTER DEFAULT PRIVILEGES FOR ROLE causal_commit_owner GRANT USAGE ON SCHEMAS TO causal_commit_app;
ALTER DEFAULT PRIVILEGES FOR ROLE causal_commit_owner
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO causal_commit_app;
ALTER DEFAULT PRIVILEGES FOR ROLE causal_commit_owner
  GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO causal_commit_app;
SQL
