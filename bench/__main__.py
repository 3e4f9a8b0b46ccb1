"""`python -m bench`: the benchmark suite (same options as `geneve-dp bench`)."""

from __future__ import annotations

from .suite import main

raise SystemExit(main())
