"""orch's on-disk schema: every name orch writes into Optuna and MLflow, with what it means.

Studies outlive orch's versions (a journal or a database holds them for months, and every
machine of a study reads them), so these names are a format: renaming one breaks every study
written before. ``tests/test_compat.py`` opens, resumes and reports a study written by an earlier
orch (``tests/fixtures/compat``) to keep it so. No other module spells these names.
"""

from __future__ import annotations

# ---- Optuna: study user attributes (storage/record.py) ------------------------------------------
#: the study file the study runs (after --set, without its storage URL, passwords hidden), as YAML
SPEC = "orch.spec"
#: the study's total number of trials (None: no limit), read under the study's lock at every claim
BUDGET = "orch.budget"
#: the id of the study's one MLflow parent run
PARENT_RUN = "orch.parent_run_id"
#: the MLflow store that holds it, its password hidden (such a store is named again by each worker)
TRACKING_URI = "orch.tracking_uri"
#: how many workers have joined: the next one's sampler seed offset (seed + offset)
SAMPLER_OFFSETS = "orch.streams"

# ---- Optuna: trial user attributes ------------------------------------------------------------------
#: ``host~tag:pid`` of the worker process running the trial (its owner, for finding it lost)
WORKER = "orch.worker"
#: the id of the trial's MLflow run
RUN_ID = "orch.mlflow_run_id"
#: the device the trial ran on (``cpu``, ``cuda:0``)
DEVICE = "orch.device"
#: why the trial failed, was pruned, interrupted or lost (one line, passwords hidden)
ERROR = "orch.error"
#: True on a FAIL trial stopped by a signal or a resource fault: retried, uses no budget
INTERRUPTED = "orch.interrupted"
#: True on a FAIL trial whose worker died or fell silent: retried, uses no budget
LOST = "orch.lost"
#: on a retry: the number of the trial it repeats
RETRY_OF = "orch.retry_of"
#: on a retry: which try of its line it is (the first try is 1)
ATTEMPT = "orch.attempt"
#: on a retry: the first trial of its line, whose checkpoint folder it continues
LINEAGE = "orch.lineage"
#: on a retry: how many tries of its line were lost before it (interruptions do not count)
LOSSES = "orch.losses"
#: the epoch a retry resumed at, from its line's last checkpoint (also an MLflow tag)
RESUMED_AT_EPOCH = "orch.resumed_at_epoch"
#: where inside that epoch: the training windows its checkpoint had done (an MLflow tag; absent at an epoch's start)
RESUMED_AT_WINDOW = "orch.resumed_at_window"

# ---- MLflow: run tags --------------------------------------------------------------------------------
#: ``study`` (a study's parent run), ``trial`` (one trial) or ``retrain`` (orch train --from-study)
ROLE = "orch.role"
#: the study (on the parent, trial and retrain runs) and the trial's number (trial and retrain runs)
STUDY = "orch.study"
TRIAL = "orch.trial"
#: the final state of a trial's run: one of :data:`STATES` (MLflow's status alone cannot tell them)
STATE = "orch.state"
#: a failed run's reason (its traceback is the artifact :data:`TRACEBACK`), other ends' reason
RUN_ERROR = "orch.error"
RUN_REASON = "orch.reason"
#: the storage URL of a study's parent run (password hidden)
STORAGE = "orch.storage"
#: a trial run's worker, slot (device) and its worker's sampler seed offset
RUN_WORKER = "orch.worker"
SLOT = "orch.slot"
SAMPLER_OFFSET = "orch.stream"
#: orch's version, the command that made the run (``train``), the device and the seed of a fit
VERSION = "orch.version"
COMMAND = "orch.command"
RUN_DEVICE = "orch.device"
SEED = "orch.seed"
#: the torch threads of a fit (the cores its process may use, split between its machine's workers)
THREADS = "orch.threads"
#: MLflow's own tag that makes a run the child of another
PARENT_TAG = "mlflow.parentRunId"


def plugin_tag(section: str) -> str:
    """The tag naming a run's plugin of ``section`` (``orch.cell``: ``lstm``)."""
    return f"orch.{section}"


def distribution_tag(section: str) -> str:
    """The tag naming that plugin's distribution and version (``orch.cell.distribution``: ``orch==0.1.0``)."""
    return f"orch.{section}.distribution"


# ---- MLflow: the parent run's summary of the study -------------------------------------------------
#: tags: the best trial's number, its run, and each of its params (``best.cell.hidden_size``)
BEST_TRIAL = "best.trial"
BEST_RUN = "best.run_id"
BEST_PARAM_PREFIX = "best."
#: metrics: trials by state (``trials_complete``, ...) and the best value (``best_val_ppl``)
TRIALS_METRIC_PREFIX = "trials_"
BEST_METRIC_PREFIX = "best_"
#: a trial run's metric: the value it reported to Optuna
OBJECTIVE = "objective"
#: a figure that could not be drawn or stored: ``plots.NAME.error`` holds why
PLOT_ERROR = "plots.{}.error"

# ---- MLflow: experiment tags (orchestrator/tracking/views.py) -----------------------------------------
#: MLflow's tag that makes its UI open an experiment on its runs (model training), not in GenAI mode
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
#: a saved view of the runs table (MLflow's shared view state): the study's trial runs, best first
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "orch-trials"

# ---- MLflow: artifacts -------------------------------------------------------------------------------
CONFIG = "config.yaml"  # a run's resolved settings
TRACEBACK = "traceback.txt"  # a failed run's traceback
STUDY_FILE = "study.yaml"  # the parent run's study file
CHECKPOINTS = "checkpoints"  # folder of a trial's best.ckpt
#: study.checkpoint_dir naming the study's MLflow run as the checkpoint store, and the folder of its
#: artifacts that holds each line's last checkpoint (``orch-checkpoints/trial-N/``)
MLFLOW_CHECKPOINTS = "mlflow"
CHECKPOINT_ARTIFACTS = "orch-checkpoints"
PLOTS = "plots"  # folder of the parent run's figures (NAME.png)
REPORT = "report.html"  # the parent run's study report

# ---- trial states: one vocabulary for Optuna, MLflow, the tables, the report and --json ---------------
#: orch's states of a trial, and the MLflow run status of each finished one. ``pruned`` finished
#: what the study asked of it (its metrics are valid up to the epoch it was pruned at);
#: ``interrupted`` (stopped by a signal) and ``lost`` (its worker died) are retried and use no
#: budget; in Optuna all three of failed, interrupted and lost are FAIL, told apart by
#: :data:`INTERRUPTED` and :data:`LOST`.
STATES = ("complete", "pruned", "failed", "interrupted", "lost", "running", "waiting")
RUN_STATUS = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "killed": "KILLED",
              "interrupted": "KILLED", "lost": "KILLED"}
