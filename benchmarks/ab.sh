#!/usr/bin/env bash
# Same-machine A/B of a change: the working tree (A) against it with some files as at a base
# commit (B), runs alternating A B, B A, A B, ... so neither side runs first every round and
# drift of the card and the machine falls on both sides (B's tree: $AB_B_DIR, default /tmp/ab_B).
#   here:       bash benchmarks/ab.sh prepare BASE_COMMIT path/one.py path/two.py
#               (writes ab_base/: untracked, so the device tool carries it)
#   on the GPU: bash benchmarks/ab.sh run ROUNDS COMMAND...
#               (COMMAND runs in each tree with AB=A|B and ROUND=1..ROUNDS in its environment;
#               $OUT, if set, is shared: put $AB$ROUND in output names)
#   afterwards: rm -rf ab_base
set -euo pipefail
case ${1:-} in
  prepare)
    base=$2; shift 2
    rm -rf ab_base
    for f in "$@"; do
      mkdir -p "ab_base/$(dirname "$f")"
      git show "$base:$f" > "ab_base/$f"
    done
    echo "$base" > ab_base/BASE ;;
  run)
    rounds=$2; shift 2
    root=$PWD b_dir=${AB_B_DIR:-/tmp/ab_B}
    rm -rf "$b_dir" && cp -r "$root" "$b_dir" && rm -rf "$b_dir/ab_base"
    (cd ab_base && find . -type f ! -name BASE -exec cp --parents {} "$b_dir/" \;)
    for round in $(seq "$rounds"); do
      order="A B"; [ $((round % 2)) = 0 ] && order="B A"
      for ab in $order; do
        dir=$root; [ "$ab" = B ] && dir=$b_dir
        echo "=== $ab$round ($(cat ab_base/BASE) for B) $(date -u +%T)"
        (cd "$dir" && AB=$ab ROUND=$round PYTHONPATH=$dir bash -c "$*") || echo "($ab$round failed)"
      done
    done ;;
  *) echo "usage: $0 prepare BASE FILE... | run ROUNDS COMMAND..." >&2; exit 2 ;;
esac
