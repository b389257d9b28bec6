"""How `watch` and every framework callback open a run directory (`mode=`, docs/integrations.md):
a neutral module, read by the store that applies the mode and by the integrations that refuse a
bad one when a callback is built."""

MODES = ("append", "new", "overwrite")
