#!/usr/bin/env bash
# Stage an A/B run of two trainer trees for a GPU machine: DEST/base and DEST/new hold the
# training, bench and operator code of two git revisions (e.g. main and a branch with a trainer
# change), each with its own bench/work/carry (python bench/run.py --prepare-carry first), plus
# DEST/whl (bench/prepare_device_wheels.sh; the wheels this suite does not import are left out)
# and bench/device_ab.sh as DEST/run.sh. DEST must travel with the call (an ignored folder of
# the checkout, carried); on the machine: cd DEST && bash run.sh. Then join the two results
# files here with bench/ab_trees.py.
# NEW may also be a patch file (git format-patch or git diff, e.g. bench/pending/*.patch): the
# new tree is then BASE_REV with that patch applied (its tests/ part left out).
# Usage: bench/prepare_ab.sh BASE_REV NEW_REV|PATCH DEST
set -euo pipefail
base_rev=${1:?base revision}
new_rev=${2:?new revision}
dest=${3:?destination folder}
repo=$(cd "$(dirname "$0")/.." && pwd)
carry="$repo/bench/work/carry"
[ -f "$carry/tok32k/tokenizer.json" ] || { echo "run: python bench/run.py --prepare-carry" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest/whl"
patch=
if [ -f "$new_rev" ]; then
  patch=$(cd "$(dirname "$new_rev")" && pwd)/$(basename "$new_rev")
  new_rev=$base_rev
fi
for side in base new; do
  rev=$base_rev
  [ "$side" = new ] && rev=$new_rev
  mkdir -p "$dest/$side/bench/work"
  git -C "$repo" archive "$rev" training bench operator pyproject.toml | tar x -C "$dest/$side"
  if [ "$side" = new ] && [ -n "$patch" ]; then
    (cd "$dest/new" && git apply --exclude='tests/*' "$patch")
  fi
  rm -rf "$dest/$side/bench/results"
  cp -r "$carry" "$dest/$side/bench/work/carry"
done
bash "$repo/bench/prepare_device_wheels.sh" "$dest/whl.all" >/dev/null
for w in "$dest"/whl.all/*.whl; do
  case $(basename "$w") in liger* | torchao* | cut_cross*) ;; *) mv "$w" "$dest/whl/" ;; esac
done
rm -rf "$dest/whl.all"
cp "$repo/bench/device_ab.sh" "$dest/run.sh"
du -sh "$dest"
