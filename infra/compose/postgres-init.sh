#!/bin/sh
# Runs once, on the Postgres container's first start (docker-entrypoint-initdb.d): one database
# each for Prefect and MLflow, owned by POSTGRES_USER.
set -eu
for db in prefect mlflow; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -c "CREATE DATABASE $db OWNER \"$POSTGRES_USER\";"
done
