# Shared by scripts/test, scripts/demo and scripts/bench: install what is missing,
# start a local tansu broker. Source it; do not run it.

# Debian packages the build and the tests need.
LABGATE_PACKAGES=(build-essential pkg-config libssl-dev libudev-dev python3 python3-venv curl procps systemd mosquitto openssl fuse3 socat chromium chromium-driver)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_packages() {
  local missing=()
  for p in "${LABGATE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# Python packages the tests and benches use, in their own virtualenv (reused): PalmSens'
# MethodSCRIPT grammar (pypalmsens, without its .NET runtime), an independent MethodSCRIPT
# data decoder (labmcp-palmsens), and confluent-kafka for the bench's peer producer.
# LABGATE_PYTHON names it.
PYTOOLS=(antlr4-python3-runtime==4.13.2 labmcp-palmsens==0.1.3 confluent-kafka==2.16.1)
PYTOOLS_NODEPS=(pypalmsens==2.2.0)
ensure_pytools() {
  local venv="$HOME/.cache/labgate-pytools"
  local probe='import labmcp_palmsens.driver, antlr4, confluent_kafka, importlib.util as u; assert u.find_spec("pypalmsens")'
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "$probe" 2>/dev/null; then
    log "installing the Python test and bench tools (pip: ${PYTOOLS[*]} ${PYTOOLS_NODEPS[*]})"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "${PYTOOLS[@]}"
    # Only pypalmsens' grammar is used: not its .NET runtime bridge and numerics. pip
    # warns about those missing; the probe below is what decides.
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "${PYTOOLS_NODEPS[@]}" 2>"$venv/pip-nodeps.log" || {
      cat "$venv/pip-nodeps.log" >&2; exit 1; }
    "$venv/bin/python" -c "$probe"
  fi
  export LABGATE_PYTHON="$venv/bin/python"
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "cargo not found: install Rust (https://rustup.rs) and run this again" >&2
      exit 1
    fi
  fi
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
}

# tansu with its memory and SQLite storage engines (the secured-Kafka tests keep SCRAM
# users in SQLite); reuses ~/.cargo/bin/tansu when it has both.
TANSU_FEATURES="dynostore,libsql"
ensure_tansu() {
  if [ -n "${TANSU_BIN:-}" ] && [ -x "$TANSU_BIN" ]; then return; fi
  if command -v tansu >/dev/null 2>&1; then
    TANSU_BIN=$(command -v tansu)
  elif [ -x "$HOME/.cargo/bin/tansu" ]; then
    TANSU_BIN="$HOME/.cargo/bin/tansu"
  fi
  if [ -z "${TANSU_BIN:-}" ] || ! tansu_has_sqlite "$TANSU_BIN"; then
    log "installing tansu (cargo install tansu --locked --features $TANSU_FEATURES; about 10 minutes, once)"
    cargo install tansu --locked --features "$TANSU_FEATURES"
    TANSU_BIN="$HOME/.cargo/bin/tansu"
  fi
  export TANSU_BIN
}

# tansu_has_sqlite BIN: whether BIN starts on a SQLite store (built with `libsql`).
tansu_has_sqlite() {
  local bin=$1 dir port pid ok=1
  dir=$(mktemp -d)
  port=$(free_port)
  (cd "$dir" && exec "$bin" broker --storage-engine sqlite://probe.db \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    >"$dir/log" 2>&1) &
  pid=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ok=0; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  return $ok
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_tansu PORT LOGFILE: starts a memory-backed broker and waits until it listens.
# Sets TANSU_PID.
start_tansu() {
  local port=$1 logfile=$2
  "$TANSU_BIN" broker --storage-engine memory://tansu/ \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    >"$logfile" 2>&1 &
  TANSU_PID=$!
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if ! kill -0 "$TANSU_PID" 2>/dev/null; then
      echo "tansu exited; its log:" >&2; cat "$logfile" >&2; return 1
    fi
    sleep 0.05
  done
  echo "tansu did not listen on $port; its log:" >&2; cat "$logfile" >&2
  return 1
}

# start_mosquitto PORT DIR: a broker for the demo / a start check, state and log in DIR.
# Sets MOSQUITTO_PID. (Integration tests start their own, tests/common.)
start_mosquitto() {
  local port=$1 dir=$2
  mkdir -p "$dir"; chmod 777 "$dir"
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\nmax_queued_messages 1000000\nlog_dest file %s/mosquitto.log\n' \
    "$port" "$dir" "$dir" >"$dir/mosquitto.conf"
  /usr/sbin/mosquitto -c "$dir/mosquitto.conf" &
  MOSQUITTO_PID=$!
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if ! kill -0 "$MOSQUITTO_PID" 2>/dev/null; then
      echo "mosquitto exited; its log:" >&2; cat "$dir/mosquitto.log" >&2; return 1
    fi
    sleep 0.05
  done
  echo "mosquitto did not listen on $port" >&2
  return 1
}

# Keep build output out of the clone in CI so warm runs reuse it.
use_ci_target_dir() {
  if [ -n "${CI:-}" ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/labgate-target}"
    # Shared by every checkout on the machine. cargo judges labgate's own build fresh
    # by its files relative to the checkout, so a build made in another checkout of the
    # same commit counts as fresh here while its binaries carry that checkout's paths
    # (the tests find their fixtures through CARGO_MANIFEST_DIR). Rebuild labgate's
    # own crates, not the dependencies, when the checkout changes.
    local marker="$CARGO_TARGET_DIR/labgate-checkout"
    if [ -e "$marker" ] && [ "$(cat "$marker")" != "$PWD" ]; then
      log "the build in $CARGO_TARGET_DIR came from $(cat "$marker"); rebuilding labgate's crates here"
      cargo clean -p labgate >&2
    fi
    mkdir -p "$CARGO_TARGET_DIR"
    echo "$PWD" >"$marker"
  fi
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
}
