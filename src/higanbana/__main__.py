"""``python -m higanbana`` (what ``accelerate launch -m higanbana train ...`` runs)."""

from .cli import main

raise SystemExit(main())
