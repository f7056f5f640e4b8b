"""pml-scale: multi-label training with partially annotated labels at Open Images scale.

Modules (imports flow one way, top to bottom):
    pml_scale.train                      the loop: run's phases, epochs, steps' bookkeeping, summary
    pml_scale.run_data / run_stores / engine / step / evaluate / tracking
                                         the trainer's components: data and loaders, per-sample
                                         stores and restore, DeepSpeed engine, one step, evaluation,
                                         metrics and clocks
    pml_scale.losses / data / stores     paper loss + baselines (one TrainingLoss face), shards and
                                         loaders, label stores
    pml_scale.kernels, config, model, metrics, labels   leaves
"""

__version__ = "0.1.0"
