#!/usr/bin/env bash
# One-shot `rabbitmq-users` service of compose/docker-compose.yml: create or update the
# broker's administrator, VIGIL_AMQP_ADMIN_USER, with the `administrator` tag and every
# permission on Vigil's vhost. Idempotent: run by every `docker compose up`.
#
# Only the administrator is created here. It is the login of the management UI, and the
# login `vigil broker setup` (the `migrate` service, which runs next) uses to create the
# executor and worker users through the HTTP API, with the least-privilege permissions
# of common/broker_access.py (PERMISSIONS). Their passwords never reach this container.
#
# Why not RABBITMQ_DEFAULT_USER: rabbitmq/rabbitmq.conf imports definitions.json at boot,
# and a node that imports definitions at boot seeds no default user at all. So the
# administrator is created here, with rabbitmqctl over Erlang distribution. The node's
# Erlang cookie comes from the broker's own data volume, mounted read-only at
# $HOME=/var/lib/rabbitmq: no extra secret to keep in sync.
#
# Environment: RABBITMQ_NODENAME (the node, default rabbit@rabbitmq),
# VIGIL_AMQP_ADMIN_USER, VIGIL_AMQP_ADMIN_PASSWORD (from compose/.env), VIGIL_AMQP_VHOST
# (`vigil`, fixed by rabbitmq/definitions.json).
set -euo pipefail

node="${RABBITMQ_NODENAME:-rabbit@rabbitmq}"
user="${VIGIL_AMQP_ADMIN_USER:?VIGIL_AMQP_ADMIN_USER is not set}"
password="${VIGIL_AMQP_ADMIN_PASSWORD:?VIGIL_AMQP_ADMIN_PASSWORD is not set}"
vhost="${VIGIL_AMQP_VHOST:?VIGIL_AMQP_VHOST is not set}"

ctl() { rabbitmqctl --node "$node" --quiet "$@"; }

# The healthcheck already says the node answers; this also waits for it to have booted.
ctl await_startup --timeout 120

# The vhost comes from definitions.json; create it if it is missing all the same.
if ! ctl list_vhosts --silent name | grep -qxF -- "$vhost"; then
    ctl add_vhost "$vhost"
fi

# compose/.env is the truth: an existing user gets the password it says.
if ctl list_users --silent | cut -f1 | grep -qxF -- "$user"; then
    ctl change_password "$user" "$password"
else
    ctl add_user "$user" "$password"
fi
# administrator: `vigil broker setup` creates users and sets permissions and the
# worker-queue policy through the HTTP API; the same login runs the management UI.
ctl set_user_tags "$user" administrator
ctl set_permissions -p "$vhost" "$user" '.*' '.*' '.*'

echo "rabbitmq-users: administrator $user may configure, write and read vhost $vhost on $node"
