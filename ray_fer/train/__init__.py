"""Training with Ray Train: the driver (`trainer`: inputs, datasets, the TorchTrainer, export),
the per-worker loop (`loop`) and run folders (`runs`: checkpoints, resume rules, bundles)."""
