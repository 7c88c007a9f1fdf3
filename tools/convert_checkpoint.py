"""Convert pretrain_moma checkpoints to and from Hugging Face folders.

The same as the `moma-convert` console script (megatron_moma/conversion/cli.py):
    python tools/convert_checkpoint.py export-hf --load CKPT --out HF_DIR [--tokenizer PATH]
    python tools/convert_checkpoint.py import-hf --hf HF_DIR --out CKPT [--tensor-model-parallel-size 2 ...]
"""

import sys

from megatron_moma.conversion.cli import main

if __name__ == "__main__":  # dist_checkpointing starts a spawn Manager: the guard is required
    sys.exit(main())
