#!/usr/bin/env bash
# Re-takes docs/prefect-ui-artifacts.png: a real Prefect server, one partition of
# configs/daily.yaml run against it, and headless Chromium (Debian's `chromium`) on the run's page.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${PORT:-4299}
home=$(mktemp -d)
export PREFECT_HOME=$home PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL=http://127.0.0.1:$port/api
.venv/bin/prefect server start --host 127.0.0.1 --port "$port" > "$home/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/api/health" > /dev/null; do sleep 1; done
export PREFECT_API_URL=http://127.0.0.1:$port/api
.venv/bin/modelyard backfill configs/daily.yaml --start 2026-11-26 --end 2026-11-26 --force
run=$(.venv/bin/python - <<'PY'
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    runs = [r for r in c.read_flow_runs() if r.name.startswith("daily-tickets-")]
    print(runs[0].id)
PY
)
url="http://127.0.0.1:$port/runs/flow-run/$run?tab=Artifacts"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$home/chrome" --hide-scrollbars \
  --window-size=1500,1300 --virtual-time-budget=30000 --screenshot=docs/prefect-ui-artifacts.png "$url"
echo "docs/prefect-ui-artifacts.png from $url"
