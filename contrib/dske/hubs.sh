#!/bin/sh
# Five DSKE security hubs on loopback, HTTPS with mutual TLS (certificates from --make-pki).
# Each hub: its own process, its own state directory (SQLite bookkeeping + PSRD block files).
set -eu
PKI=/tmp/dske/pki
port=8451
for hub in hank helen hilary holly hugo; do
    qkdagent dske-hub --name "$hub" --state "/tmp/dske/$hub" --port "$port" \
        --cert "$PKI/$hub.pem" --key "$PKI/$hub.key" --ca "$PKI/ca.pem" \
        --ready-file "/tmp/dske/$hub.port" &
    port=$((port + 1))
done
wait
