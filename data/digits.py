"""``python -m data.digits``: write the moving handwritten-digits data set (real UCI handwriting, captions).

The generator lives in :mod:`ddm.digits`, below the evaluator that must know its vocabulary
(``ddm.eval.digits``); this module is the data side's entry point and re-exports its public names.
"""
from ddm.digits import (DigitClipSpec, caption_of, main, make_digits_dataset, render_digit_clip,  # noqa: F401
                        split_indices)

if __name__ == "__main__":
    main()
