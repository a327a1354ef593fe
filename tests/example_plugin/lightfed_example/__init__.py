"""An example lightfed strategy plugin (see ``docs/plugins.md`` in the lightfed repository).

The strategies live in :mod:`lightfed_example.strategies`, the module the entry point names; it is not
re-exported here, so each class has exactly one import path (``lightfed_example.strategies.FedMeanClip``)
for a config's ``class_path``.
"""
