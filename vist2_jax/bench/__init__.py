"""The bench room: measurements behind ``vist2 bench`` (mask sparsity, data throughput,
generation efficiency, attention kernels). Each module adds its own sub-command."""
