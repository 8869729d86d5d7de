"""The saved model of a run: weights in safetensors plus a JSON description.

``model.safetensors`` (the final model) and ``best.safetensors`` (the model of the epoch
with the lowest validation RMSE, with ``val_fraction > 0``) hold the weights: tensors
only, no pickled code, read back exactly in their own dtype. Next to each, a JSON file
(``model.json``, ``best.json``) holds the full resolved config (the combination with all
its parameters), what the network's shape needs from the data (``network``: the number
of features), the epoch, the combframe and torch versions and the sha256 of the weights
file. :func:`read_model` refuses a weights file whose hash differs (tampered, truncated,
or from another run). :func:`combframe.app.load` builds the model from both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from combframe.app.checkpoint import CheckpointError, atomic_write

__all__ = ["MODEL_FILES", "read_model", "save_model"]

#: The weights and description files of each saved model.
MODEL_FILES = {
    "final": ("model.safetensors", "model.json"),
    "best": ("best.safetensors", "best.json"),
}


def save_model(folder: Path, which: str, state: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """Write the weights ``state`` (a ``state_dict``) and ``info`` as the ``which`` model.

    Entries of ``state`` that are not tensors (a module's extra state) go into the JSON
    file under ``extra_state``; the weights are written before the JSON file that
    vouches for them, each atomically.
    """
    import torch
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    extra = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    weights_name, info_name = MODEL_FILES[which]
    data = save(tensors)
    atomic_write(folder / weights_name, data)
    meta = {
        "format": 1,
        "weights": weights_name,
        "sha256": hashlib.sha256(data).hexdigest(),
        **info,
        "extra_state": extra,
    }
    atomic_write(folder / info_name, (json.dumps(meta, indent=2) + "\n").encode())


def read_model(folder: Path, which: str = "final") -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the saved ``state_dict`` (on the CPU, in its saved dtype) and its description.

    Raises
    ------
    CheckpointError
        If ``which`` is unknown, the files are missing or unreadable, or the weights'
        sha256 differs from the one recorded.
    """
    from safetensors.torch import load

    if which not in MODEL_FILES:
        raise CheckpointError(f"which: expected one of {sorted(MODEL_FILES)}; got {which!r}")
    weights_name, info_name = MODEL_FILES[which]
    try:
        meta = json.loads((folder / info_name).read_text(encoding="utf-8"))
        data = (folder / str(meta["weights"])).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        hint = " (best.json exists only for runs with val_fraction > 0)" if which == "best" else ""
        raise CheckpointError(
            f"{str(folder)!r} holds no readable {which} model ({info_name} and "
            f"{weights_name}): {exc}{hint}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"{str(folder / weights_name)!r} does not match its sha256 in {info_name} "
            f"(file {digest[:12]}..., recorded {str(meta.get('sha256'))[:12]}...): it was "
            "changed or truncated after the run wrote it; retrain or restore the file"
        )
    state: dict[str, Any] = dict(load(data))
    state.update(meta.get("extra_state") or {})
    return state, meta
