"""``python -m fp8fx`` runs the ``fp8fx`` command (see :mod:`fp8fx.cli`)."""

from __future__ import annotations

if __name__ == "__main__":
    from fp8fx.cli import main

    raise SystemExit(main())
