#!/usr/bin/env bash
# Start a Ray cluster for rlsync across machines, then run a job on it.
#   head:    bash scripts/ray_cluster.sh head 0            (node 0 of the job's node layout)
#   worker:  bash scripts/ray_cluster.sh worker 1 HEAD_IP  (node 1, 2, ...)
#   run:     bash scripts/ray_cluster.sh run JOB.yaml HEAD_IP
# Each node advertises the resource rlsync_node_<n>, so `rlsync run` pins the ranks that the job's
# plan puts on node n to that machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=.venv/bin/ray
case "${1:-}" in
  head)   $RAY start --head --port 6379 --resources "{\"rlsync_node_${2:-0}\": 1000}" ;;
  worker) $RAY start --address "${3:?head ip}:6379" --resources "{\"rlsync_node_${2:?node index}\": 1000}" ;;
  run)    .venv/bin/rlsync run "${2:?job}" --address "${3:?head ip}:6379" --report out/report ;;
  stop)   $RAY stop ;;
  *) echo "usage: $0 head N | worker N HEAD_IP | run JOB.yaml HEAD_IP | stop" >&2; exit 2 ;;
esac
