"""FAULT service: ``hmm_range_fault`` for remote devices (snapshot or populate)."""
