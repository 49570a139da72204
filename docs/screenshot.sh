#!/usr/bin/env bash
# Re-takes the README's screenshots with headless Chromium (Debian's `chromium`) and a real Prefect server:
#   docs/report.png               the demo's _report.html (configs/demo.yaml run against the server)
#   docs/prefect-ui-report.png    the same charts as the demo run's `demo-tickets-report` artifact in the UI
#   docs/prefect-ui-artifacts.png one partition of configs/daily.yaml, its run page with the artifacts
# Starts vLLM servers (a few minutes on a CPU): run it alone on the machine. It runs in a copy of the
# committed tree in a temporary folder, so that the pictures show no path of your checkout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
port=${PORT:-4299}
home=$(mktemp -d)
mkdir "$home/modelyard"
git -C "$root" archive HEAD | tar -x -C "$home/modelyard"
cd "$home/modelyard"
ln -s "$root/.venv" .venv
ln -s "$root/.venv-engine" .venv-engine
export PREFECT_HOME=$home PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL=http://127.0.0.1:$port/api
export MODELYARD_CACHE=$home/cache.sqlite  # an empty request cache: the models answer every row
.venv/bin/prefect server start --host 127.0.0.1 --port "$port" > "$home/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$home"' EXIT
until curl -sf "http://127.0.0.1:$port/api/health" > /dev/null; do sleep 1; done
export PREFECT_API_URL=http://127.0.0.1:$port/api

shot() {  # shot URL PNG WIDTH HEIGHT
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$home/chrome" --hide-scrollbars \
    --window-size="$3,$4" --virtual-time-budget=30000 --screenshot="$2" "$1"
  echo "$2 from $1"
}

.venv/bin/modelyard run configs/demo.yaml
shot "file://$PWD/out/demo-tickets/_report.html" "$root/docs/report.png" 1100 2700
report=$(.venv/bin/python - <<'PY'
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
with get_client(sync_client=True) as c:
    arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["demo-tickets-report"])))
    print(arts[0].id)
PY
)
shot "http://127.0.0.1:$port/artifacts/artifact/$report" "$root/docs/prefect-ui-report.png" 1400 2200

.venv/bin/modelyard backfill configs/daily.yaml --start 2026-11-26 --end 2026-11-26 --force
run=$(.venv/bin/python - <<'PY'
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    runs = [r for r in c.read_flow_runs() if r.name.startswith("daily-tickets-")]
    print(runs[0].id)
PY
)
shot "http://127.0.0.1:$port/runs/flow-run/$run?tab=Artifacts" "$root/docs/prefect-ui-artifacts.png" 1500 1300
