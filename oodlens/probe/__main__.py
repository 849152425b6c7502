"""``python -m oodlens.probe``."""

import os

from .cli import main_entry

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
main_entry()
