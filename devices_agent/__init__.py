"""Flotilla's device agent: enrolls a board, keeps its model current, reports metrics, trains.

A standalone package: it never imports Django or the server apps, and imports torch only
to train.
"""

__version__ = "0.1.0"
