#!/usr/bin/env python
"""Stage 4: oracle labels on a seeded share of P0's and the targets' responses.  python 04_oracle_labels.py"""
from ope_prep.runner import script_main

if __name__ == "__main__":
    script_main("oracle", __doc__)
