"""Watchers: how hmmd learns that a target's memory changed, and what it watches with.

``proc`` polls /proc/PID/maps and /proc/PID/pagemap over the mirrored
intervals and turns differences into invalidation events; ``uffd`` reads a
target's userfaultfd events as they happen, scans written pages and holds
strict writes; ``acquire`` obtains those userfaultfds (offers, pidfd_getfd,
injection, fork adoption); ``supervisor`` starts and stops all of it per mm.
"""
