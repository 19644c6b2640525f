"""hmmirror's programs: ``hmmctl``, ``hm-agent``, the demo and the coherence checker.

They are built on the agent library (``hmmirror.client``) and, where they start an hmmd of their
own (the demo, the checker), on ``hmmirror.daemon``; the library itself never imports this package.
"""

#: The installed distribution of these programs (its version: ``--version``).
DISTRIBUTION = "hmmirror-tools"
