"""Offline jobs built on ``core``: pretraining (single process and DDP), evaluation and fine-tuning."""
