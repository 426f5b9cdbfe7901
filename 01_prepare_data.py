#!/usr/bin/env python
"""Stage 1: sample N prompts.  python 01_prepare_data.py --samples 5 --seed 42"""
from ope_prep.runner import script_main
from ope_prep.stages.prepare import add_args

if __name__ == "__main__":
    script_main("prepare", __doc__, add_args)
