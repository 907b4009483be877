"""Evaluating stored models side by side with their parents.

``datasets`` reads the evaluation data (with file and line in every error), ``runtimes`` loads a model
directory for scoring (transformers, or llama.cpp / transformers for a GGUF), ``metrics`` computes
perplexity and task accuracies over a runtime, ``harness`` runs lm-evaluation-harness tasks, ``suite``
decides which models to evaluate and caches results in lineage, ``table`` renders them.
"""
