#!/usr/bin/env python
"""Run all stages: python run_pipeline.py [N] [--config PATH] [--force-step STAGE] [--fresh]"""
import sys

from ope_prep.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
