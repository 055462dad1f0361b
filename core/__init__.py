"""What every app shares and none owns: errors, roles, the audit log, events, dispatch, leases.

`core` imports no Flotilla app. The apps sit above it in layers that import-linter holds:
config > frontend > training > fleet > models_registry > core.
"""
