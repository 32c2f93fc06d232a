"""Timing: placements side by side, the per-machine GPU probe, and the models they run on."""
