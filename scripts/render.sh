#!/usr/bin/env bash
# Render this template's working tree (uncommitted changes included) into DST with Copier:
#   scripts/render.sh DST [key=value ...]     e.g. scripts/render.sh /tmp/p parallelism=fsdp amp=bf16
# Every answer not given takes its default. The template parts are copied to a temporary directory
# first: Copier renders a plain directory as it is, but a git checkout at its latest tag.
set -euo pipefail
if (($# < 1)); then
    echo "usage: $0 DST [key=value ...]" >&2
    exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
copier=${COPIER:-copier}
if [[ -x /work/venv/bin/copier && -z ${COPIER:-} ]] && ! command -v copier > /dev/null; then
    copier=/work/venv/bin/copier
fi
dst=$1
shift
template=$(mktemp -d)
trap 'rm -rf "$template"' EXIT
for part in copier.yml validators.jinja config_keys.jinja template hooks; do
    [[ -e $root/$part ]] && cp -r "$root/$part" "$template/"
done
data=()
for answer in "$@"; do
    data+=(--data "$answer")
done
"$copier" copy --trust --defaults --quiet --overwrite "${data[@]}" "$template" "$dst"
