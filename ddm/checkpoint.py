"""Deprecated module name, kept for one release: it held the export format and the file helpers, which now
live in :mod:`ddm.export_files` (safetensors exports) and :mod:`ddm.files` (atomic writes, links, file hashes),
with :func:`ddm.models.weights.load_state_dict_strict` below the models. The name said "checkpoint", but
training checkpoints are Lightning's (``train/``), not these."""
import warnings

from ddm.export_files import *  # noqa: F401,F403
from ddm.export_files import _read_index, _resolve_export  # noqa: F401
from ddm.files import *  # noqa: F401,F403
from ddm.models.weights import load_state_dict_strict  # noqa: F401

warnings.warn("ddm.checkpoint is deprecated: import from ddm.export_files (exports) or ddm.files (atomic writes)",
              DeprecationWarning, stacklevel=2)
