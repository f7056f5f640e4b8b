"""Dataset parsers: annotation files in, a validated, sorted list of inputs per split out.

Why this split of work: parsing annotations is cheap and single-threaded; it decides the class
order, which rows are malformed, and the input order from which sample ids are assigned. Images
are not opened here (the workers of ``convert`` do that).

One module per format, each returning a :class:`Source` built with :class:`SplitBuilder`
(``base``). Row-level problems become :class:`Reject` records (file + line or key + reason,
counted in the manifest); whole-file problems raise :class:`InputError` naming the file. A new
dataset is a new module here exporting ``parse_<name>`` (plus its subcommand in ``shard.py``).
"""

from .base import MISSING, NEG, POS, InputError, Reject, Source, SplitBuilder, SplitInputs
from .coco import parse_coco
from .cub import parse_cub
from .lists import parse_list
from .nuswide import parse_nuswide
from .openimages import parse_openimages

FORMATS = ("coco", "openimages", "nuswide", "cub", "csv", "jsonl")

__all__ = ["FORMATS", "MISSING", "NEG", "POS", "InputError", "Reject", "Source", "SplitBuilder", "SplitInputs",
           "parse_coco", "parse_cub", "parse_list", "parse_nuswide", "parse_openimages"]
