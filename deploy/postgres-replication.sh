#!/bin/sh
# Runs once, when the `postgres` service initialises its data directory: lets the streaming
# replica of the `cluster` profile connect for replication (the image's pg_hba.conf only
# admits ordinary connections). PostgreSQL 15's defaults already suit a primary
# (wal_level=replica, max_wal_senders=10).
set -e
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
