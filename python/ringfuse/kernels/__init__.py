"""Triton kernels for CUDA tensors: ``ringfuse.kernels.<op>``.

The sources live in the repository's top-level ``kernels/`` directory, which the wheel (and
an editable install) maps into this package; that directory has no ``__init__.py`` of its
own, so a Python started at the repository root (``python -m pytest``) cannot import it as
a top-level ``kernels`` package, which would shadow Hugging Face's ``kernels`` distribution
(imported by transformers)."""
