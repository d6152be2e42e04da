# Shared by the scripts that compare the appliance with Debian's tgt: installing tools,
# starting tgtd on its own control index and a free loopback port, and stopping only what they
# started. Source it, then call `tgt_start FILE IQN LOG`; `cleanup` runs on exit.
# shellcheck shell=bash

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Installs the Debian packages that provide the given commands (command:package pairs).
need_tools() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

pids=()
ctl_port=""
work=""
cleanup() {
  # tgtd ignores SIGTERM while it has targets: ask it to shut down first.
  if [ -n "$ctl_port" ]; then
    tgtadm -C "$ctl_port" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
    tgtadm -C "$ctl_port" --op delete --mode system >/dev/null 2>&1 || true
  fi
  sleep 0.5
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

# tgt_start FILE IQN LOG: serves FILE as LUN 1 of target IQN; sets tgt_port and tgt_pid.
tgt_start() {
  tgt_port=$(free_port)
  ctl_port=$((RANDOM % 900 + 100)) # an index for tgtd's control socket, not a TCP port
  tgtd -f -C "$ctl_port" --iscsi portal="127.0.0.1:$tgt_port" >"$3" 2>&1 &
  tgt_pid=$!
  pids+=("$tgt_pid")
  wait_port "$tgt_port"
  tgtadm -C "$ctl_port" --lld iscsi --op new --mode target --tid 1 -T "$2"
  tgtadm -C "$ctl_port" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$1"
  tgtadm -C "$ctl_port" --lld iscsi --op bind --mode target --tid 1 -I ALL
}
