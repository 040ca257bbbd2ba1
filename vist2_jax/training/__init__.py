"""Training: optimizer, sharded step, metrics, checkpoints, the loop, multi-host set-up."""
