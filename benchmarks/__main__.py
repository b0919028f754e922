"""`python -m benchmarks`: run every benchmark script and collect one results.json."""

from .runner import main

raise SystemExit(main())
