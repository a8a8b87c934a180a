"""``python -m ragcli``: the ``rag`` command."""

from ragcli import main

main()
