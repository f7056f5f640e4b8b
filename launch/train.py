#!/usr/bin/env python
"""Entry point: `deepspeed launch/train.py --config configs/x.yaml [a.b=value ...]`.

Works the same under the deepspeed launcher (one or many nodes), torchrun, or plain python.
All logic lives in `pml_scale.train`.
"""

import sys

from pml_scale.train import main

if __name__ == "__main__":
    sys.exit(main())
