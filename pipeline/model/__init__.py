"""PyTorch models and data: building, loading, pruning, fine-tuning, fake quantization and
evaluation. Imports only `pipeline.core`."""
