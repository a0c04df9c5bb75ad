#!/bin/sh
# First start of the compose stack's PostgreSQL: the gateway's role and database, and a
# role for Grafana's ledger data source. That role gets SELECT on the ledger table only,
# granted by the one-shot `ledger-grant` service once the gateway has created the table.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
  -v egress_pw="$EGRESS_DB_PASSWORD" -v reader_pw="$GRAFANA_LEDGER_PASSWORD" <<'SQL'
CREATE ROLE egress LOGIN PASSWORD :'egress_pw';
CREATE ROLE grafana_reader LOGIN PASSWORD :'reader_pw';
CREATE DATABASE agent_egress OWNER egress;
\connect agent_egress
GRANT CONNECT ON DATABASE agent_egress TO grafana_reader;
GRANT USAGE ON SCHEMA public TO grafana_reader;
SQL
