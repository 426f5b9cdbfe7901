#!/usr/bin/env python
"""Stage 2b: teacher-force the base policy's responses under every policy.  python 02b_compute_logprobs.py"""
from ope_prep.runner import script_main

if __name__ == "__main__":
    script_main("logprobs", __doc__)
