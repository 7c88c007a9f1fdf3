#!/usr/bin/env python
"""Preprocess JSON lines of text and image codes into megatron indexed datasets.

A thin wrapper around megatron_moma/data/preprocess.py, also installed as `moma-preprocess`.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_moma.data.preprocess import main  # noqa: E402  (after the path is set)

if __name__ == "__main__":
    sys.exit(main())
