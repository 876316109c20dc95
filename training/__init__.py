"""Training program support: data pipelines and the training loop."""
