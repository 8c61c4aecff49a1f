#!/usr/bin/env bash
# One study, several machines' worth of workers, on one box: the whole scaling-out recipe, runnable.
#
#   bash examples/distributed/local-cluster.sh                       # echo study, 8 trials, 2 workers
#   STUDY=studies/sum_game.yaml TRIALS=12 WORKERS=4 bash examples/distributed/local-cluster.sh
#
# Needs a PostgreSQL server (PGADMIN, default postgres@127.0.0.1:5432 with trust or a password in
# the URL) and orch installed (ORCH, default .venv/bin/orch). It creates two databases (the Optuna
# study, the MLflow backend), starts an MLflow tracking server on a free port, creates the study,
# starts WORKERS `orch study worker` processes from two different folders (as two machines
# would), waits for them, shows the study and leaves the server running for you to browse.
set -euo pipefail
cd "$(dirname "$0")/../.."
ORCH=$(realpath "${ORCH:-.venv/bin/orch}")
PY=$(dirname "$ORCH")/python
STUDY=${STUDY:-studies/echo.yaml}
TRIALS=${TRIALS:-8}
WORKERS=${WORKERS:-2}
PGADMIN=${PGADMIN:-postgresql://postgres@127.0.0.1:5432/postgres}
TAG=orch_demo_$$
WORK=$(mktemp -d)

# 1. PostgreSQL: a database for the Optuna study and one for the MLflow server
for db in "${TAG}_optuna" "${TAG}_mlflow"; do psql "$PGADMIN" -qc "CREATE DATABASE $db"; done
export ORCH_STORAGE=${PGADMIN%/*}/${TAG}_optuna          # every `orch study` command reads it
MLFLOW_DB=${PGADMIN%/*}/${TAG}_mlflow

# 2. The MLflow tracking server: PostgreSQL backend, artifacts stored and served by the server
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# (the database URL, which may hold a password, through MLflow's variable: never on a command line)
MLFLOW_BACKEND_STORE_URI="$MLFLOW_DB" "$PY" -m mlflow server --artifacts-destination "$WORK/artifacts" \
    --host 127.0.0.1 --port "$PORT" --workers 1 > "$WORK/mlflow-server.log" 2>&1 &
export MLFLOW_TRACKING_URI=http://127.0.0.1:$PORT
until curl -sf "$MLFLOW_TRACKING_URI/health" > /dev/null; do sleep 1; done
echo "MLflow server: $MLFLOW_TRACKING_URI (log: $WORK/mlflow-server.log)"

# 3. Create the study once: Optuna study, its budget, MLflow experiment and parent run
NAME=$("$ORCH" study create "$STUDY" --trials "$TRIALS" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["study"])')

# 4. Workers: any number, from anywhere that reaches the database and the server. Half of them
#    run from another folder with nothing but the study's name, as on another machine.
mkdir -p "$WORK/machine-b"
pids=()
for i in $(seq 1 "$WORKERS"); do
    dir=$([ $((i % 2)) -eq 1 ] && echo "$PWD" || echo "$WORK/machine-b")
    (cd "$dir" && exec "$ORCH" study worker "$NAME" > "$WORK/worker-$i.log" 2>&1) &
    pids+=($!)
done
echo "started $WORKERS workers (logs: $WORK/worker-*.log)"
for pid in "${pids[@]}"; do wait "$pid"; done

# 5. Watch and compare
"$ORCH" study show "$NAME"
"$ORCH" study best "$NAME"
echo
echo "Compare the trials in the MLflow UI: $MLFLOW_TRACKING_URI  (Ctrl-C here stops the server)"
echo "Afterwards, drop the databases ${TAG}_optuna and ${TAG}_mlflow (psql \"\$PGADMIN\" -c 'DROP DATABASE ...')"
wait
