#!/usr/bin/env bash
# Apache Kafka (KRaft, one node) for development and the integration tests, from Maven Central.
#
#   kafka.sh resolve                 jars into .cache/kafka/<version>/libs (once; then instant)
#   kafka.sh start [options]         format storage if new, start in the background, wait, print
#   kafka.sh run   [options]         the same in the foreground (Ctrl-C stops it)
#   kafka.sh stop  [options]         SIGTERM, then SIGKILL after 20 s
#   kafka.sh status [options]        running or not, and where
#
# options: --port N (clients, default 9092)  --controller-port N (default port+1)
#          --data-dir DIR (default ${TMPDIR:-/tmp}/portcullis-kafka-<port>)  --fresh (wipe data)
# environment: KAFKA_VERSION (default 4.0.0), PORTCULLIS_CACHE (default <repo>/.cache),
#              KAFKA_HEAP_OPTS (default -Xms128m -Xmx512m)
# Needs Java 17+ and, for `resolve`, Maven. portcullis/brokers.py (KafkaBroker) does the same
# from Python with the same server.properties.template and log4j2.properties.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VERSION=${KAFKA_VERSION:-4.0.0}
CACHE=${PORTCULLIS_CACHE:-$ROOT/.cache}
LIBS="$CACHE/kafka/$VERSION/libs"

say() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

resolve() {
  if [ -f "$LIBS/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka $VERSION (Debian: maven)"
  say "resolving Apache Kafka $VERSION and its runtime dependencies from Maven Central"
  local tmp
  mkdir -p "$(dirname "$LIBS")"
  tmp=$(mktemp -d "$(dirname "$LIBS")/.libs.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'; rmdir '$(dirname "$LIBS")' 2>/dev/null || true" EXIT
  # (Debian's Maven 3.8 prints colour resets even with -B; sed strips them, pipefail keeps
  # Maven's exit status.)
  if ! mvn -q -B -f "$HERE/pom.xml" -Dkafka.version="$VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" 2>&1 \
      | sed -e 's/\x1b\[[0-9;]*m//g' >&2; then
    die "Maven could not resolve org.apache.kafka:kafka_2.13:$VERSION (see the messages above)"
  fi
  ls "$tmp"/kafka_2.13-"$VERSION".jar >/dev/null 2>&1 || die "kafka_2.13-$VERSION.jar missing after resolve"
  touch "$tmp/.complete"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  trap - EXIT
  say "Kafka $VERSION jars in $LIBS ($(find "$LIBS" -name '*.jar' | wc -l) jars)"
}

PORT=9092
CPORT=
DATA=
FRESH=0
parse() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) PORT=$2; shift 2 ;;
      --controller-port) CPORT=$2; shift 2 ;;
      --data-dir) DATA=$2; shift 2 ;;
      --fresh) FRESH=1; shift ;;
      *) die "unknown option $1 (see the top of $0)" ;;
    esac
  done
  CPORT=${CPORT:-$((PORT + 1))}
  DATA=${DATA:-${TMPDIR:-/tmp}/portcullis-kafka-$PORT}
  PIDFILE="$DATA/kafka.pid"
  LOG="$DATA/kafka.log"
  CONFIG="$DATA/server.properties"
}

running_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

JVM=()
jvm() {
  command -v java >/dev/null || die "Java 17+ is needed (Debian: openjdk-17-jre-headless)"
  local heap
  read -r -a heap <<<"${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}"
  JVM=(java "${heap[@]}" -XX:+UseSerialGC -XX:TieredStopAtLevel=1
    -Djava.awt.headless=true -Dfile.encoding=UTF-8
    "-Dlog4j2.configurationFile=$HERE/log4j2.properties" "-Dkafka.logs.dir=$DATA"
    -cp "$LIBS/*")
}

prepare() {
  resolve
  if running_pid >/dev/null; then die "already running (pid $(cat "$PIDFILE")) in $DATA"; fi
  for p in "$PORT" "$CPORT"; do port_busy "$p" && die "port 127.0.0.1:$p is already in use"; done
  if [ "$FRESH" = 1 ]; then rm -rf "$DATA"; fi
  mkdir -p "$DATA"
  jvm
  sed -e "s|@HOST@|127.0.0.1|g" -e "s|@PORT@|$PORT|g" -e "s|@CONTROLLER_PORT@|$CPORT|g" \
      -e "s|@DATA_DIR@|$DATA/data|g" "$HERE/server.properties.template" > "$CONFIG"
  if [ ! -f "$DATA/data/meta.properties" ]; then
    local id
    # (an id starting with "-" would be read as an option, so draw again, as Kafka does)
    id=-
    while [ "${id:0:1}" = - ]; do
      id=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    done
    "${JVM[@]}" kafka.tools.StorageTool format --cluster-id "$id" --config "$CONFIG" \
      --ignore-formatted >>"$LOG" 2>&1 || die "formatting KRaft storage failed; see $LOG"
  fi
}

start() {
  parse "$@"
  prepare
  local began pid
  began=$(date +%s%N)
  nohup "${JVM[@]}" kafka.Kafka "$CONFIG" >>"$LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" > "$PIDFILE"
  for _ in $(seq 1 900); do
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOG" >&2; die "Kafka exited during startup; log: $LOG"; }
    if grep -q "Kafka Server started" "$LOG" 2>/dev/null && port_busy "$PORT"; then
      say "Apache Kafka $VERSION ready in $(( ($(date +%s%N) - began) / 1000000 )) ms (pid $pid, data $DATA, log $LOG)"
      echo "127.0.0.1:$PORT"
      return 0
    fi
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  die "Kafka did not start within 90 s; log: $LOG"
}

run() {
  parse "$@"
  prepare
  say "Apache Kafka $VERSION on 127.0.0.1:$PORT (controller $CPORT, data $DATA); Ctrl-C stops it"
  exec "${JVM[@]}" kafka.Kafka "$CONFIG"
}

stop() {
  parse "$@"
  local pid
  pid=$(running_pid) || { say "not running (no live pid in $PIDFILE)"; rm -f "$PIDFILE"; return 0; }
  kill -TERM "$pid"
  for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; say "stopped (pid $pid)"; return 0; }
    sleep 0.1
  done
  say "no exit 20 s after SIGTERM: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}

status() {
  parse "$@"
  local pid
  if pid=$(running_pid); then echo "running: 127.0.0.1:$PORT (pid $pid, data $DATA)"; else
    echo "not running (data dir $DATA)"; return 1; fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  resolve) resolve ;;
  start) start "$@" ;;
  run) run "$@" ;;
  stop) stop "$@" ;;
  status) status "$@" ;;
  *) echo "usage: $0 resolve|start|run|stop|status [--port N] [--controller-port N] [--data-dir DIR] [--fresh]" >&2; exit 2 ;;
esac
