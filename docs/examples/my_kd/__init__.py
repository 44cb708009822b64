"""A user's own kdx extensions, kept outside kdx: a method, a model and a data set.

docs/extending.md walks through each file; kdx finds them through ``PYTHONPATH`` (the code) and
``--config-dir`` (the configs in ``docs/examples/conf``). Nothing in kdx is edited.
"""
