#!/usr/bin/env python
"""Stage 5: check every file, compute statistics and OPE diagnostics, write the report and the CJE export.  python 05_validate_and_summarize.py"""
from ope_prep.runner import script_main

if __name__ == "__main__":
    script_main("summarize", __doc__)
