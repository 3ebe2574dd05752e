"""Deprecated module name, kept for one release: ``python -m ddm.export`` is now ``python -m ddm.assemble`` (it
assembles a model folder from training runs; an "export" is what a training job writes, the safetensors file
of :mod:`ddm.export_files`). Same flags; this name warns and runs the new one."""
import sys
import warnings

from ddm.assemble import *  # noqa: F401,F403
from ddm.assemble import build_parser, find_router_exports, main, stage_exports  # noqa: F401
from ddm.files import staging_dir, swap_into_place  # noqa: F401

warnings.warn("ddm.export is deprecated: use ddm.assemble (python -m ddm.assemble)", DeprecationWarning, stacklevel=2)

if __name__ == "__main__":
    print("note: python -m ddm.export is deprecated; use python -m ddm.assemble (same flags)", file=sys.stderr)
    sys.exit(main())
