"""``python -m cpt_training.nxd.converter_main <flags>``: run NxD's checkpoint converter.

NxD ships the converter as a class (``neuronx_distributed.scripts.checkpoint_converter.
CheckpointConverterBase``) without a ``__main__`` block, so ``python -m
neuronx_distributed.scripts.checkpoint_converter`` would exit 0 having done nothing; its Llama
example wraps the class in a 3-line script that is not part of the wheel. This is that
wrapper, with one change: flags are parsed strictly, so a misspelt or stale flag (the docs
still show ``--convert_from_full_model``) fails loudly instead of being ignored.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from neuronx_distributed.scripts.checkpoint_converter import CheckpointConverterBase

    converter = CheckpointConverterBase()
    args = converter.get_arg_parser().parse_args(list(argv) if argv is not None else None)
    converter.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
