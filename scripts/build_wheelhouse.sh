#!/usr/bin/env bash
# Build wheelhouse/ (gitignored): diffusers, peft, transformers, accelerate and every dependency of theirs that the
# GPU image lacks, as wheels, for an offline GPU machine that has torch + triton but no diffusers (issue 22).
# Never torch, triton, nvidia-*/cuda-* packages, nor torch's own dependencies (filelock, fsspec, jinja2, markupsafe,
# mpmath, networkx, setuptools, sympy, typing-extensions): every torch install has them.
# Versions are pinned to this machine's venv (the tested ones); wheels are fetched by pip from the configured index.
#
#   PYTHON_VERSIONS=3.12 scripts/build_wheelhouse.sh   # for the GPU image's Python (check it first: `python -V`
#                                                      # there); default: this venv's Python. One version with
#                                                      # numpy is ~44 MiB; each more version adds ~28 MiB
#   NUMPY=0 ...                                        # leave numpy (17 MiB a version) out: the image has it
#                                                      # (`python -c "import numpy"` there)
# The pinned accelerate and transformers need Python >= 3.11 (a 3.10 image would need older pins).
#
# On the GPU machine (no index, no internet), from the repository root (--no-deps: requirements.txt is the whole
# closure already, and pip's resolver would try to satisfy torch's own pins):
#   python -m pip install --no-index --no-deps --find-links wheelhouse -r wheelhouse/requirements.txt
# The device tool carries ignored paths up to 64 MiB in all: the script prints the size and fails above 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-/work/main/.venv/bin/python}"
OUT="${OUT:-wheelhouse}"
PYTHON_VERSIONS="${PYTHON_VERSIONS:-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
NUMPY="${NUMPY:-1}"
LIMIT_MB="${LIMIT_MB:-60}"
rm -rf "$OUT"
mkdir -p "$OUT"
# the dependency closure of the roots in this venv, pinned, minus what the GPU image has
"$PY" - "$OUT/requirements.txt" <<'PYEOF'
import os, re, sys
from importlib import metadata

ROOTS = ["diffusers", "peft", "transformers", "accelerate", "safetensors", "huggingface_hub", "tqdm", "pillow",
         "numpy", "tomli"]
# LEAN=1 (default): dependencies nothing on the GPU run imports (CLIs, hub downloads, the kernels hub), left out to
# keep the wheelhouse under the carry limit; checked in a torch + triton only venv: fusion_engine, diffusers, peft
# and transformers import, and bench/gpu_e2e.py --smoke runs, without them. The install uses --no-deps for this.
LEAN = {"hf-xet", "kernels", "typer", "rich", "pygments", "click", "shellingham", "markdown-it-py", "mdurl",
        "annotated-doc", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "tomlkit"}
SKIP = {"torch", "triton", "filelock", "fsspec", "jinja2", "markupsafe", "mpmath", "networkx", "setuptools",
        "sympy", "typing-extensions"}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def skipped(name):
    lean = os.environ.get("LEAN", "1") == "1" and name in LEAN
    return lean or name in SKIP or name.startswith(("nvidia-", "cuda-"))


pins, todo = {}, [norm(r) for r in ROOTS]
while todo:
    name = todo.pop()
    if name in pins or skipped(name):
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        if name == "tomli":  # Python < 3.11 only (fusion_engine's pyproject); pin a known version
            pins[name] = "2.2.1"
            continue
        continue  # an optional extra's dependency that is not installed here
    pins[name] = dist.version
    for req in dist.requires or []:
        if "extra ==" in req:
            continue  # optional extras are not installed
        todo.append(norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
with open(sys.argv[1], "w") as f:
    f.write("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
print(f"{len(pins)} packages pinned: " + " ".join(sorted(pins)))
PYEOF
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
for v in $PYTHON_VERSIONS; do
  # --no-deps: the closure above is the whole list (pip's own resolution would pull torch for peft/accelerate);
  # tomli only exists for Python < 3.11
  grep -v '^tomli==' "$OUT/requirements.txt" | { [ "$NUMPY" = 1 ] && cat || grep -v '^numpy=='; } > "$OUT/.reqs-$v"
  case "$v" in 3.10) grep '^tomli==' "$OUT/requirements.txt" >> "$OUT/.reqs-$v" || true ;; esac
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$v" "${PLATFORMS[@]}" \
      --dest "$OUT" -r "$OUT/.reqs-$v"
  rm "$OUT/.reqs-$v"
done
# tomli is conditional in requirements.txt, as fusion_engine's pyproject has it; numpy=0: the image's own
sed -i 's/^\(tomli==.*\)$/\1; python_version < "3.11"/' "$OUT/requirements.txt"
[ "$NUMPY" = 1 ] || sed -i 's/^numpy==.*$/numpy/' "$OUT/requirements.txt"
size_kb=$(du -sk "$OUT" | cut -f1)
echo "wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels, $((size_kb / 1024)) MiB, Python $PYTHON_VERSIONS"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
  echo "wheelhouse is over ${LIMIT_MB} MiB: build it for the GPU image's Python only (PYTHON_VERSIONS=3.x)" >&2
  exit 1
fi
