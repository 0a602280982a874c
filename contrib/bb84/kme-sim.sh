#!/bin/sh
# Two simulated ETSI 014 KMEs whose link is a simulated BB84 link: the key rate, QBER and aborts
# are those of decoy BB84 over 25 km of fibre (qkdagent-bb84's supply). Then run
#   qkdagent run -c alice-kme.toml   and   qkdagent run -c bob-kme.toml
# (two processes). KME_A listens on 8441, KME_B on 8442; certificates under /tmp/bb84/pki.
set -eu
PKI=/tmp/bb84/pki
exec qkdagent kme-sim --pki "$PKI" --port 8441 \
  --kme KME_A=alice --kme KME_B=bob \
  --supply bb84:distance_km=25,block_bits=1000000,cascade=yanetal,capacity_bits=8000000,pulse_rate_hz=1000000000
