"""`python -m norga.info`: the self-check ([`main`][norga.info.check.main])."""

from .check import main

raise SystemExit(main())
