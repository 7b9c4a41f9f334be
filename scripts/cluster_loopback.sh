#!/usr/bin/env bash
# The on-prem cluster path end to end on one machine: `ray up configs/cluster/local.yaml` over SSH to
# 127.0.0.1 (an sshd started here with a generated key), `ray job submit` of a shrunk quickstart that uses the
# placement's `student` resource, then `ray down`. Run from anywhere as root: bash scripts/cluster_loopback.sh
# It works on the checkout it lives in (run dirs under runs/ included); tests/test_cluster_loopback.py runs it on
# a copy that holds an earlier test's finished run dir.
#
# Needs root (it installs openssh-server and rsync with apt if missing, and isolates itself with `unshare`).
# Everything runs in private PID, network and mount namespaces: its own loopback (port 22, 6379 and 8265 are
# free whatever else runs here), its own /tmp/ray, and a private home for root (ssh keys, ~/.ray/auth_token,
# ~/ray_bootstrap_config.yaml, ~/.bashrc), so the `ray stop` that `ray up`/`ray down` run on the head only sees
# this cluster's processes. The namespace, and every process in it, ends with the script.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

if [ "${1:-}" != "--inside" ]; then
  [ "$(id -u)" = 0 ] || { echo "cluster_loopback: needs root (sshd on port 22, unshare)" >&2; exit 2; }
  if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync >/dev/null
  fi
  exec unshare --pid --fork --mount-proc --net --mount "$0" --inside
fi

log() { echo "[loopback $(date +%T)] $*"; }
ip link set lo up
WORK="$(mktemp -d /tmp/hkd-loopback.XXXXXX)"
mkdir -p /tmp/ray "$WORK/home" /run/sshd
mount -t tmpfs tmpfs /tmp/ray
# `ray up` also writes outside /tmp/ray: its SSH control socket (/tmp/ray_ssh_<user hash>/<cluster hash>), and
# its config cache in TMPDIR (set to $WORK for `ray up`/`ray down`). Nothing of this cluster outlives the script.
short_hash() { printf %s "$1" | sha256sum | cut -c1-10; }
SSH_CONTROL="/tmp/ray_ssh_$(short_hash "$(id -un)")"
cleanup() {
  umount /etc/passwd 2>/dev/null || true
  rm -rf "$WORK" "$SSH_CONTROL/$(short_hash hkd4vlm-local)"
  rmdir "$SSH_CONTROL" 2>/dev/null || true
}
trap cleanup EXIT
# A private home for root, in this namespace only: a copy of /etc/passwd naming it (the real /root keeps
# serving whatever lives there, e.g. the Python the venv links to).
sed "s#^\(root:[^:]*:0:0:[^:]*:\)[^:]*:#\1$WORK/home:#" /etc/passwd > "$WORK/passwd"
mount --bind "$WORK/passwd" /etc/passwd
export HOME="$WORK/home"

# ssh: a fresh user key (the path local.yaml names) and host key; sshd on 127.0.0.1:22 of this namespace.
mkdir -m 700 -p "$HOME/.ssh"
ssh-keygen -q -t ed25519 -N '' -f "$HOME/.ssh/id_ed25519"
cp "$HOME/.ssh/id_ed25519.pub" "$HOME/.ssh/authorized_keys"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"
cat > "$WORK/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port 22
HostKey $WORK/host_key
PidFile $WORK/sshd.pid
AuthorizedKeysFile $HOME/.ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
UsePAM no
StrictModes no
EOF
/usr/sbin/sshd -f "$WORK/sshd_config"
log "sshd up on 127.0.0.1:22"

# What `ray up` finds on the "machine": this checkout's venv (so setup skips the install), the node's role
# resources, and a Ray auth token (token auth on for the cluster and the job client alike).
mkdir -p "$HOME/hkd4vlm"
ln -s "$ROOT/.venv" "$HOME/hkd4vlm/.venv"
echo '{"teacher": 2, "student": 2}' > "$HOME/.hkd-resources.json"
# Ray's commands run in a login shell that reads ~/.bashrc; on a busy machine the raylet needs longer than
# Ray's 60 s default to register.
echo 'export RAY_raylet_start_wait_time_s=300 RAY_USAGE_STATS_ENABLED=0' > "$HOME/.bashrc"
export PATH="$ROOT/.venv/bin:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token  # clients send the token
ray get-auth-token --generate >/dev/null

cd "$ROOT"
log "ray up"
TMPDIR="$WORK" ray up -y --no-config-cache configs/cluster/local.yaml
trap 'log "ray down (after a failure)"; TMPDIR="$WORK" ray down -y configs/cluster/local.yaml || true; cleanup' EXIT
ray status --address 127.0.0.1:6379
# What the node got: the package, not the checkout (run dirs are the user's results, never shipped).
test -f "$HOME/hkd4vlm/orchestrator/cli.py" && test -f "$HOME/hkd4vlm/pyproject.toml"
for kept_out in runs .git mlruns; do
  [ ! -e "$HOME/hkd4vlm/$kept_out" ] || { log "ray up shipped $kept_out/ to the node"; exit 1; }
done
log "ray up: the cluster is up; the node got the package and no run dir"
# The dashboard (the job server) comes up a few seconds after `ray start` returns; any HTTP answer (401
# without the token) means it listens.
dashboard_up() { [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8265/api/version)" != 000 ]; }
for _ in $(seq 120); do dashboard_up && break; sleep 1; done
dashboard_up || { log "dashboard not up after 120 s"; tail -30 /tmp/ray/session_latest/logs/dashboard.log >&2; exit 1; }

TINY="{hidden: 32, layers: 1, heads: 2, kv_heads: 1, intermediate: 64, vision_hidden: 32, vision_depth: 1, vision_heads: 2}"
log "ray job submit"
ray job submit --address http://127.0.0.1:8265 --submission-id loopback --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"sqlite:///$WORK/mlflow.db\"}, \"excludes\": [\".venv\", \".git\", \"runs\"]}" \
  -- hkd run configs/quickstart.yaml --run-dir "$WORK/runs/loopback" --set name=loopback \
  --set "levels={S: $TINY}" --set "direct.levels=[S]" --set ppod.enabled=false --set tcrd.enabled=false \
  --set vocab_size=1024 --set "data.synth={train: 8, val: 4, test: 4}" \
  --set "direct.train={epochs: 1, batch_size: 4}" --set "direct.overrides={}" --set resources.cpus_per_worker=1 \
  --set "placement={student: {student: 1}}"
status="$(ray job status --address http://127.0.0.1:8265 loopback)"
[[ "$status" == *"Job 'loopback' succeeded"* ]] || { log "job status: $status"; exit 1; }
RUN="$WORK/runs/loopback"
for f in models/S/model.safetensors models/S/config.json models/S/tokenizer.json stages/S-direct.json report.json \
         logs/hkd.log logs/ray-session.txt; do
  test -s "$RUN/$f" || { log "the job's run dir lacks $f"; exit 1; }
done
[ ! -L "$RUN/logs/ray" ] || { log "the run dir links into Ray's temp dir"; exit 1; }
log "job SUCCEEDED; its model dir is complete"

log "ray down"
TMPDIR="$WORK" ray down -y configs/cluster/local.yaml
trap cleanup EXIT
for _ in $(seq 10); do pgrep -f 'raylet|gcs_server' >/dev/null || break; sleep 1; done
if pgrep -af 'raylet|gcs_server'; then log "Ray processes left 10 s after ray down (above)"; exit 1; fi
log "ray down: no Ray process left"
