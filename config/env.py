"""The one place that reads the environment.

Every setting that can change between machines comes from here, so `grep env\\.` shows
the whole configuration surface.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
