"""Watchers: how hmmd learns that a target's memory changed.

``proc`` polls /proc/PID/maps and /proc/PID/pagemap over the mirrored
intervals and turns differences into invalidation events.
"""
