"""Loading weights into a model strictly, with an error that says what does not fit (below every model file)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["load_state_dict_strict"]


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly, or raise a ValueError naming the missing keys,
    unexpected keys and shape mismatches (``source`` says where the weights came from).

    A model built on the meta device gets the tensors assigned (no random init, no copy).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"{name} {items[:10]}{' ...' if len(items) > 10 else ''}"
                    for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                        ("shape mismatches (file vs model)", shapes)) if items]
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
