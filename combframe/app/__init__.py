"""The ``combframe`` command line and its demonstration trainer.

Nothing here is imported by ``import combframe``: the library (combinations, strategies,
``MultiPoseModel``) stands alone, and this package builds on its public API. Plots
(matplotlib) and progress bars (tqdm) are optional extras, ``combframe[plot]`` and
``combframe[progress]``.
"""
