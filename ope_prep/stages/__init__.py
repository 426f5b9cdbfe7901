"""The stages' names, in order, and their scripts; the modules behind them: registry.py."""

STAGES = [
    # (name, script)
    ("prepare", "01_prepare_data.py"),
    ("generate", "02_generate_responses.py"),
    ("logprobs", "02b_compute_logprobs.py"),
    ("judge", "03_judge_scores.py"),
    ("oracle", "04_oracle_labels.py"),
    ("summarize", "05_validate_and_summarize.py"),
]
STAGE_NAMES = [name for name, _ in STAGES]
UNIT_STAGES = STAGE_NAMES[1:-1]     # work in units (a work file, quarantine, usage): 2 to 4
STAGE_ALIASES = {"1": "prepare", "2": "generate", "2b": "logprobs", "3": "judge", "4": "oracle",
                 "5": "summarize"}


def later_stages(name: str) -> list[str]:
    """`name` and every stage after it."""
    return STAGE_NAMES[STAGE_NAMES.index(name):]

