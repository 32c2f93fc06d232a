"""Routing data, with no llama.cpp in it: profiles, their statistics, replays, workloads, synthetic routing."""
