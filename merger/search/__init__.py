"""Merge search: find merge parameters that keep every parent's skill, scored only on the search's own lines.

- ``split``: which lines of each task file the search may score, and which are held back as test lines.
- ``scoring``: batched teacher-forced scoring of answers (exact match, log-likelihood), logits at answer
  positions only.
- ``lora_mix``: module surgery that gives a model one coefficient per (adapter, LoRA module).
- ``learned``: the learned-coefficients searcher (gradient descent on those coefficients only).
"""
