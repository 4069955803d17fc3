#!/usr/bin/env bash
# Idempotent set-up: installs the Debian packages the build and tests need, only when
# they are missing. Called by ./dev and .ci/run; safe to run any number of times.
#   libclang-dev       bindgen, for librocksdb-sys (RocksDB is built from source)
#   protobuf-compiler  protoc, for etcd-client's build (our own protos use protox)
#   libprotobuf-dev    the well-known .proto files etcd-client's protos import
#   etcd-server        started by the cluster tests on 127.0.0.1
#   openssl            the local cluster's CA and certificates (scripts/cluster.sh)
set -euo pipefail

packages=(libclang-dev protobuf-compiler libprotobuf-dev etcd-server openssl)

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: missing ${missing[*]} and no apt-get: install them with your package manager" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
    echo "setup: missing ${missing[*]}; run as root or install sudo" >&2
    exit 1
  fi
fi
echo "setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts etcd as a service on install; the tests start their own.
if command -v systemctl >/dev/null 2>&1; then "${sudo[@]}" systemctl disable --now etcd >/dev/null 2>&1 || true; fi
echo "setup: done" >&2
