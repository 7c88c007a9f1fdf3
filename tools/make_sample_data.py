#!/usr/bin/env python
"""Make a sample corpus: the bundled digits (no download) or, with --corpus real, emoji and text
from npm and Debian packages.

A thin wrapper around megatron_moma/data/sample_corpus.py, also installed as `moma-sample-data`.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_moma.data.sample_corpus import main  # noqa: E402  (after the path is set)

if __name__ == "__main__":
    sys.exit(main())
