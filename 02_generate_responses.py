#!/usr/bin/env python
"""Stage 2: generate a response from every policy for every prompt.  python 02_generate_responses.py"""
from ope_prep.runner import script_main

if __name__ == "__main__":
    script_main("generate", __doc__)
