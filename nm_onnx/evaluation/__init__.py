"""Evaluation: perplexity, zero-shot tasks, latency, reports."""
