"""``python -m higanbana.cli`` (the same as ``python -m higanbana``)."""

from . import main

raise SystemExit(main())
