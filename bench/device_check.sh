#!/usr/bin/env bash
# One prepared GPU check in one call (bench/README.md): parity, engine, compiled, GPU I/O, HTTP end to end.
#
#   bash bench/device_check.sh --prepare          here, with PyPI: wheels into .whl/, fixtures + photos into .devdata/
#   bash bench/device_check.sh --out "$OUT"       on the GPU machine (no network): installs .whl/ into /tmp/site
#   bash bench/device_check.sh --cpu-dry-run      every step at toy sizes on the CPU (uses this environment)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Every package the service needs that the GPU image lacks (KINDS.md), pinned to the versions tested here.
WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4
pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5
python-multipart==0.0.34 uvicorn==0.54.0 sqlalchemy==2.1.9 typing_extensions==4.16.0 annotated-doc==0.0.7
opentelemetry-api==1.45.2 sniffio==1.3.1 alembic==1.20.1 Mako==1.4.3 simplejpeg==1.9.0 swagger_ui_bundle==1.1.0"

if [ "${1:-}" = "--prepare" ]; then
    rm -rf .whl .devdata && mkdir -p .whl .devdata/photos || exit 1
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS || exit 1
    cp -r ../shared/fixtures/reference_parity .devdata/ || exit 1
    find ../shared/data/real_defects -name '*.jpg' -not -path '*ground_truth*' -exec cp {} .devdata/photos/ \; || exit 1
    du -sh .whl .devdata
    exit 0
fi

case " $* " in
*" --cpu-dry-run "*) export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ;;
*)
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site:$PWD"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    ;;
esac
export PYTHONUNBUFFERED=1
exec "$PY" bench/device_check.py "$@"
