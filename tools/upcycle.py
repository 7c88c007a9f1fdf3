"""Upcycle a 1t1i or dense checkpoint into an n-experts-per-modality MoMa checkpoint.

The same as the `moma-upcycle` console script (megatron_moma/training/upcycling.py):
    python tools/upcycle.py --load CKPT_1T1I --save CKPT_4T4I --moma-experts-per-modality 4 4
"""

import sys

from megatron_moma.training.upcycling import main

if __name__ == "__main__":  # dist_checkpointing starts a spawn Manager: the guard is required
    sys.exit(main())
