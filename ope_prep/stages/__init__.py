"""The stages, in order. Each module has `fingerprint(config, args)` and `run(config, args, fp)`."""

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


def later_stages(name: str) -> list[str]:
    """`name` and every stage after it."""
    return STAGE_NAMES[STAGE_NAMES.index(name):]
