"""``python -m keystone``: the same CLI as the ``keystone`` command."""

from __future__ import annotations

from keystone.cli import main

if __name__ == "__main__":
    main()
