"""Entry point: `torchrun --nproc_per_node=2 pretrain.py +recipe=nvfp4_tiny` (see README)."""

import sys

from nvfp4_megatron.cli.pretrain import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing's async writer spawns processes
    sys.exit(main())
