"""Training: optimizer, train state, sharded step, metrics, the loop, multi-host set-up."""
