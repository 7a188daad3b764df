"""Evaluation metrics that need a trained model (the sync expert's LSE-D / LSE-C)."""
