#!/usr/bin/env python
"""Stage 3: a judge score for every (prompt, policy) response.  python 03_judge_scores.py"""
from ope_prep.runner import script_main

if __name__ == "__main__":
    script_main("judge", __doc__)
