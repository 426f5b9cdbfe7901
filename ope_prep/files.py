"""Every file and folder name under <data_dir>, in one place (the modules that write them import
them from here), and the project's own folder. Paths are relative to the data dir unless a
function says otherwise."""

from __future__ import annotations

from pathlib import Path

# The checkout: config.yaml, models/, docs/ (relative paths in a config are from its own folder)
PROJECT_DIR = Path(__file__).resolve().parent.parent

# Stage outputs, in stage order
PROMPTS = "prompts.jsonl"
RUN_PARAMS = "run.json"     # the run's samples and seed (stage 1), read by the later stages
RESPONSES = "responses.jsonl"
LOGPROBS = "logprobs.jsonl"
BASE_TEXT_LOGPROBS = "base_text_logprobs.jsonl"   # the base policy's text events (targets with another tokenizer)
SELF_CONSISTENCY = "self_consistency.jsonl"
OVERLAP = "overlap.json"    # each target's weight figures, from stage 2b, before anything is paid
JUDGE_SCORES = "judge_scores.jsonl"
ORACLE_LABELS = "oracle_labels.jsonl"

# Stage 5's
REPORT = "report.md"
DATASET_INFO = "dataset_info.json"
PLOTS_DIR = "plots"
CJE_DIR = "cje"
LOGGED_DATA = f"{CJE_DIR}/logged_data.jsonl"
FRESH_DIR = f"{CJE_DIR}/responses"
VALIDATION_DIR = f"{CJE_DIR}/validation"
P0_DET = "p0_scored_deterministic.jsonl"
P0_UNC = "p0_scored_uncertainty.jsonl"
TARGETS_DET = "targets_scored_deterministic.jsonl"
TARGETS_UNC = "targets_scored_uncertainty.jsonl"
CALIBRATION = "labeling/oracle_labels_calibration_detailed.jsonl"
VALIDATION = "labeling/oracle_labels_validation_detailed.jsonl"

# The runner's and the stages' bookkeeping
# Written when this pipeline makes the data dir (or first uses it empty): --fresh renames only a
# directory that holds it, never one that merely has the config's data_dir name (data_dir: ~).
DATA_DIR_MARKER = ".ope-prep-data-dir"
WORK_DIR = "work"               # work/<stage>.jsonl: a stage's units as they finish
QUARANTINE_DIR = "quarantine"   # quarantine/<stage>.jsonl: the units a stage gave up on, and why
SNAPSHOTS = "snapshots"
RUN_STATE = "logs/run_state.json"     # written by the runner (pipeline.py)
# engine_canary/<model key>.json: what the run's first engine check of a model on an engine saw
# (backends/engine_canary.py); every later check is compared with it
ENGINE_CANARY_DIR = "engine_canary"


def work_path(data_dir: Path, name: str) -> Path:
    return data_dir / WORK_DIR / f"{name}.jsonl"


def quarantine_file(stage: str) -> str:
    return f"{QUARANTINE_DIR}/{stage}.jsonl"


def usage_file(stage: str) -> str:
    """What a stage's last run spent (UsageTotals; per model for stages 2 and 2b): read by stage 5's
    cost table, and left out of the digests later stages depend on."""
    return f"{stage}_usage.json"


def engine_canary_file(model_key: str) -> str:
    return f"{ENGINE_CANARY_DIR}/{model_key}.json"
