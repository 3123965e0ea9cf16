#!/bin/sh
# Installed as iptables, iptables-save, iptables-restore and their ip6tables twins in
# /usr/local/sbin (ahead of /usr/sbin on PATH): runs the same command of the backend the
# host uses, so our chains sit in the tables that kube-proxy and the CNI program.
#   PORTCULLIS_IPTABLES_BACKEND=nft | legacy   use that one
#   PORTCULLIS_IPTABLES_BACKEND=auto (default)  whichever of the two holds more rules now
#     (as kube-proxy's iptables-wrapper decides), decided once and kept in
#     ${PORTCULLIS_IPTABLES_CACHE:-/tmp/portcullis-iptables-backend}
set -eu
name=$(basename "$0")
case "$name" in
  iptables|iptables-save|iptables-restore|ip6tables|ip6tables-save|ip6tables-restore) ;;
  *) echo "portcullis-iptables: called as $name: not an iptables command" >&2; exit 2 ;;
esac
family=${name%%-*}  # iptables or ip6tables
tool=${name#"$family"}  # "", -save or -restore
backend=${PORTCULLIS_IPTABLES_BACKEND:-auto}
cache=${PORTCULLIS_IPTABLES_CACHE:-/tmp/portcullis-iptables-backend}
rules() {  # how many rules the backend $1 holds, both families
  n=0
  for f in iptables ip6tables; do
    c=$("$f-$1-save" 2>/dev/null | grep -c '^-' || true)
    n=$((n + ${c:-0}))
  done
  echo "$n"
}
if [ "$backend" = auto ]; then
  if [ -s "$cache" ]; then
    backend=$(cat "$cache")
  else
    if [ "$(rules legacy)" -gt "$(rules nft)" ]; then backend=legacy; else backend=nft; fi
    echo "$backend" > "$cache" 2>/dev/null || true
  fi
fi
case "$backend" in
  nft|legacy) ;;
  *) echo "portcullis-iptables: PORTCULLIS_IPTABLES_BACKEND=$backend: expected nft, legacy or auto" >&2
     exit 2 ;;
esac
exec "$family-$backend$tool" "$@"
