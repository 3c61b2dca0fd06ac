"""Evaluation and inference: embedding passes, metrics on pair sets, ROC plots, Predictor, export."""
