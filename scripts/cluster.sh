#!/usr/bin/env bash
# A real local cluster for a newcomer: etcd on a temporary directory, N feedgraph nodes
# joined to it (16 shards, 3 replicas), the demo graph loaded through the cluster,
# then the queries to try. Ctrl-C (or any exit) stops everything this script started.
#   scripts/cluster.sh [--nodes N] [--pins P] [--no-wait]
# --pins makes a smaller graph (the default is the demo's 1M pins); --no-wait exits
# (and stops the cluster) once it has served a feed, for CI.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
bin="$target/release"
nodes=3
pins=1000000
wait=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --pins) pins="$2"; shift 2 ;;
    --no-wait) wait=0; shift ;;
    *) echo "usage: scripts/cluster.sh [--nodes N] [--pins P] [--no-wait]" >&2; exit 2 ;;
  esac
done

dir="$(mktemp -d -t feedgraph-cluster.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port that nothing listens on now (bash only: no python on a bare machine), below
# the kernel's ephemeral range: no outgoing connection (a node's own, to etcd) can be
# holding it when a node binds it.
ephemeral_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "$ephemeral_low" -gt 12000 ] 2>/dev/null || ephemeral_low=32768
free_port() {
  local p
  while :; do
    p=$((10000 + RANDOM % (ephemeral_low - 10000)))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}
# Waits (20 s at most) until process $1 listens on port $2; says why not, with the end
# of log $3, if it exits or times out.
wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
    if ! kill -0 "$1" 2>/dev/null; then
      echo "the process meant to listen on 127.0.0.1:$2 exited; the end of $3:" >&2
      tail -20 "$3" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$2 after 20 s; the end of $3:" >&2
  tail -20 "$3" >&2
  return 1
}

client_port=$(free_port); peer_port=$(free_port)
etcd --name local --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$client_port" --advertise-client-urls "http://127.0.0.1:$client_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "local=http://127.0.0.1:$peer_port" >"$dir/etcd.log" 2>&1 &
pids+=($!)
wait_port "$!" "$client_port" "$dir/etcd.log"
export FEEDGRAPH_CLUSTER="etcd://127.0.0.1:$client_port"
echo "etcd on 127.0.0.1:$client_port ($dir)"

# Tokens per role, made here, readable by this user only: the nodes accept them
# (FEEDGRAPH_*_TOKENS) and send the admin token to each other; clients send
# FEEDGRAPH_TOKEN. A cluster without tokens refuses to start unless --insecure.
new_token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
(umask 077; for role in read write admin; do new_token >"$dir/$role.token"; done)
export FEEDGRAPH_READ_TOKENS="$(cat "$dir/read.token")"
export FEEDGRAPH_WRITE_TOKENS="$(cat "$dir/write.token")"
export FEEDGRAPH_ADMIN_TOKENS="$(cat "$dir/admin.token")"
# This script's own commands (status, ingest, feed) use the admin token.
export FEEDGRAPH_TOKEN="$FEEDGRAPH_ADMIN_TOKENS"

# Mutual TLS: a CA made here signs one certificate for 127.0.0.1, which every node
# serves and presents to the others; the clients here present it too.
(
  umask 077
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -days 2 \
    -subj "/CN=feedgraph local CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -keyout "$dir/ca.key" -out "$dir/ca.crt"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -subj "/CN=feedgraph node" \
    -keyout "$dir/node.key" -out "$dir/node.csr"
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/node.ext"
  openssl x509 -req -in "$dir/node.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/node.ext" -out "$dir/node.crt"
) >"$dir/openssl.log" 2>&1 || { echo "making the local CA failed:" >&2; cat "$dir/openssl.log" >&2; exit 1; }
cat >"$dir/tls.toml" <<EOT
[tls]
cert_file = "$dir/node.crt"
key_file = "$dir/node.key"
ca_file = "$dir/ca.crt"
client_auth = true
EOT
export FEEDGRAPH_TLS_CA="$dir/ca.crt" FEEDGRAPH_TLS_CERT="$dir/node.crt" FEEDGRAPH_TLS_KEY="$dir/node.key"

first=""
for i in $(seq 1 "$nodes"); do
  # A port taken between free_port and the bind makes the node exit: try new ports.
  for attempt in 1 2 3; do
    grpc=$(free_port); metrics=$(free_port)
    [ "$metrics" != "$grpc" ] || metrics=$(free_port)
    "$bin/feedgraph" serve --config "$dir/tls.toml" --node-id "node-$i" --listen "127.0.0.1:$grpc" --metrics-listen "127.0.0.1:$metrics" \
      --data-dir "$dir/node-$i" --replicas 3 --log warn >"$dir/node-$i.log" 2>&1 &
    pid=$!
    pids+=($pid)
    wait_port "$pid" "$grpc" "$dir/node-$i.log" && break
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir/node-$i"
    [ "$attempt" = 3 ] && exit 1
    echo "starting node-$i again on other ports" >&2
  done
  echo "node-$i on 127.0.0.1:$grpc (metrics 127.0.0.1:$metrics, log $dir/node-$i.log)"
  [ -z "$first" ] && first="127.0.0.1:$grpc"
done

# Converged: every shard led and followed.
for _ in $(seq 1 300); do
  "$bin/feedgraph" cluster status 2>/dev/null | head -1 | grep -q " converged" && break
  sleep 0.2
done
echo "loading the demo graph ($pins pins) through the cluster at $first ..."
"$bin/feedgraph-load" ingest --addr "$first" --pins "$pins" >"$dir/ingest.log" 2>&1 || {
  echo "ingest failed:" >&2; tail -5 "$dir/ingest.log" >&2; exit 1; }
"$bin/feedgraph" cluster status
echo
echo "a following feed through node-1:"
"$bin/feedgraph" feed --addr "$first" --user 42 --page-size 5

if [ "$wait" = 1 ]; then
  cat <<EOT

The cluster is up, with tokens per role in $dir/{read,write,admin}.token, and
mutual TLS (CA $dir/ca.crt; clients present $dir/node.crt).
Try, in another terminal:
  export FEEDGRAPH_CLUSTER=$FEEDGRAPH_CLUSTER
  export FEEDGRAPH_TLS_CA=$dir/ca.crt FEEDGRAPH_TLS_CERT=$dir/node.crt FEEDGRAPH_TLS_KEY=$dir/node.key
  FEEDGRAPH_TOKEN=\$(cat $dir/read.token) $bin/feedgraph feed --addr $first --user 42
  FEEDGRAPH_TOKEN=\$(cat $dir/read.token) $bin/feedgraph feed --addr $first --user 42 --home
  $bin/feedgraph feed --addr $first --user 42     # no token: UNAUTHENTICATED
  FEEDGRAPH_TOKEN=\$(cat $dir/admin.token) $bin/feedgraph cluster status
  FEEDGRAPH_TOKEN=\$(cat $dir/admin.token) $bin/feedgraph cluster drain node-1 --wait
  kill <a node's pid> and watch the status: its shards get new leaders within ~3 s
Ctrl-C stops the nodes and etcd and removes $dir.
EOT
  while true; do sleep 3600; done
fi
