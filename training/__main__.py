"""``python -m training`` / ``torchrun --nproc_per_node=N -m training``: run captioner-train."""

import sys

from training.cli import train_main

sys.exit(train_main())
