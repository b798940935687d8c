"""Evaluation of packed models: perplexity, size and effective bits, reports."""
