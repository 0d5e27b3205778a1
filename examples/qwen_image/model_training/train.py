"""DiffSynth-Studio's training entry point, kept so the seed's commands work unchanged:

    accelerate launch examples/qwen_image/model_training/train.py --task sft:data_process ...

It forwards every flag to `autosplit run`.
"""

import sys

from autosplit.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
