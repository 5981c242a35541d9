"""python -m jsim.predict: the jsim-predict command."""

from jsim.predict.cli import entry_point

entry_point()
