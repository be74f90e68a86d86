"""The run folder and what a run writes: checkpoints, metrics, reports, evaluation results, off-policy shards."""
