"""The training stack: data, loss, fused kernels' wiring, optimizers, the loop, reports."""
