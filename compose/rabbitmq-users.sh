#!/usr/bin/env bash
# One-shot `rabbitmq-users` service of compose/docker-compose.yml: give Vigil's AMQP user
# access to its vhost on the compose broker. Idempotent: run by every `docker compose up`.
#
# Why not RABBITMQ_DEFAULT_USER: rabbitmq/rabbitmq.conf imports definitions.json at boot,
# and a node that imports definitions at boot seeds no default user at all. So the user
# is created here, with rabbitmqctl over Erlang distribution. The node's Erlang cookie
# comes from the broker's own data volume, mounted read-only at $HOME=/var/lib/rabbitmq:
# no extra secret to keep in sync.
#
# Environment: RABBITMQ_NODENAME (the node, default rabbit@rabbitmq), VIGIL_AMQP_USER,
# VIGIL_AMQP_PASSWORD, VIGIL_AMQP_VHOST (from compose/.env).
set -euo pipefail

node="${RABBITMQ_NODENAME:-rabbit@rabbitmq}"
user="${VIGIL_AMQP_USER:?VIGIL_AMQP_USER is not set}"
password="${VIGIL_AMQP_PASSWORD:?VIGIL_AMQP_PASSWORD is not set}"
vhost="${VIGIL_AMQP_VHOST:?VIGIL_AMQP_VHOST is not set}"

ctl() { rabbitmqctl --node "$node" --quiet "$@"; }

# The healthcheck already says the node answers; this also waits for it to have booted.
ctl await_startup --timeout 120

# The vhost comes from definitions.json; create it if an operator changed VIGIL_AMQP_VHOST.
if ! ctl list_vhosts --silent name | grep -qxF -- "$vhost"; then
    ctl add_vhost "$vhost"
fi

# compose/.env is the truth: an existing user gets the password it says.
if ctl list_users --silent | cut -f1 | grep -qxF -- "$user"; then
    ctl change_password "$user" "$password"
else
    ctl add_user "$user" "$password"
fi
# policymaker: `vigil broker setup` sets the worker-queue policy through the HTTP API
# (and the same login shows the vhost in the management UI).
ctl set_user_tags "$user" policymaker
ctl set_permissions -p "$vhost" "$user" '.*' '.*' '.*'

echo "rabbitmq-users: $user may configure, write and read vhost $vhost on $node"
