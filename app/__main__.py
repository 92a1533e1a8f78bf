"""`python -m app` / `charlstm-serve`: the supervisor (app/supervisor.py) starts one engine
process per model and the HTTP workers; `python -m app --help` lists the settings."""

from __future__ import annotations

import sys

from app.supervisor import main

if __name__ == "__main__":
    sys.exit(main())
