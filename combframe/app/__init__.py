"""The ``combframe`` command line, its trainer, and the runs it saves.

Nothing here is imported by ``import combframe``: the library (combinations, strategies,
``MultiPoseModel``) stands alone, and this package builds on its public API. Plots
(matplotlib), progress bars (tqdm) and TensorBoard logs are optional extras,
``combframe[plot]``, ``combframe[progress]`` and ``combframe[tensorboard]``.

``combframe.app.load(run_dir)`` returns the trained model of a run folder
(:func:`combframe.app.predict.load`), and ``combframe.app.predict_file(run, data=...)``
predicts every compound of a file in its order (:func:`combframe.app.predict.predict_file`);
they are imported on first use, so that importing this package (``combframe --help``)
does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load", "predict_file"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from combframe.app.predict import load

        return load
    if name == "predict_file":
        from combframe.app.predict import predict_file

        return predict_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
