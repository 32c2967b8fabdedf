"""The model side: loading the pipeline, running batches through it, device facts."""
