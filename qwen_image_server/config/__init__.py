"""What the operator writes: settings, the model list, LoRA references, presets, startup checks.

Imports nothing of the server but `errors`: every other layer may read it.
"""
