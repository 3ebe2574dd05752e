"""``python -m data.synthetic``: write the built-in synthetic data set (moving shapes with captions).

The generator itself lives in :mod:`ddm.synthetic`, below the evaluators that must know its vocabulary
(``ddm.eval.groundtruth``, ``ddm.eval.domain``): ``ddm`` never imports ``data``. This module is the data
side's entry point and re-exports the generator's public names.
"""
from ddm.synthetic import (FAMILIES, MOTIONS, SHAPE_COLOURS, SPEEDS, TEXTURE_WORDS, ClipSpec, Family,  # noqa: F401
                           main, make_synthetic_dataset, render_clip)

if __name__ == "__main__":
    main()
