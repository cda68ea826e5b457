#!/bin/sh
# docker-entrypoint-initdb.d script of the compose `postgres` service: runs once, when the
# postgres-data volume is empty. Vigil connects as VIGIL_DB_USER, a role that owns
# VIGIL_DB_NAME and nothing more (not a superuser, as common/config.py asks; the local
# stack does the same). The image sources this file, so it sets no shell options: a
# failing statement stops the init through psql's exit status.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    -v db_user="$VIGIL_DB_USER" -v db_password="$VIGIL_DB_PASSWORD" -v db_name="$VIGIL_DB_NAME" \
    <<'SQL'
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'db_user', :'db_password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db_name', :'db_user') \gexec
SQL
