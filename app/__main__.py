"""`python -m app` is the `gateway` command."""

from app.cli import main

raise SystemExit(main())
