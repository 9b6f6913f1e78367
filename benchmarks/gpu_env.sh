# Sourced by the gpu_*.sh scripts on the lent GPU machine: installs the wheels carried in .whl/
# (benchmarks/gpu_wheels.sh: av, diffusers, webdataset, open_clip, ... for the device image's
# torch and transformers) into /tmp/site once -- skipped when $1 already imports, e.g. a
# script run by gpu_all.sh after it installed them -- and puts it and the repo on PYTHONPATH.
need="${1:-av}"
if ! python3 -c "import $need" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
