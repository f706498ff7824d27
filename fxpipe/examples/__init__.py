"""Example models and data shipped with fxpipe (the main job trains on them)."""
