"""pml-scale: multi-label training with partially annotated labels at Open Images scale.

Modules (imports flow one way, top to bottom):
    pml_scale.train                      DeepSpeed loop, eval, checkpoint/resume
    pml_scale.losses / data / stores     paper loss + baselines, shards and loaders, label stores
    pml_scale.kernels, config, model, metrics, labels   leaves
"""

__version__ = "0.1.0"
