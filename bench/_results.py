"""Where and how the bench tools write their JSON: one helper for all of them."""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write(name: str, tag: str, payload: dict, explicit: str | None, argv=None, **meta) -> Path:
    """Write ``{"meta": ..., **payload}`` to ``explicit``, else ``$OUT/<name>.json``, else
    ``bench/results/<name>-<tag>.json``; meta has the date, the command line and ``meta``."""
    path = Path(explicit) if explicit else (
        Path(os.environ["OUT"]) / f"{name}.json" if os.environ.get("OUT")
        else RESULTS / f"{name}-{tag}.json")
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv), **meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **payload}, indent=1, default=str))
    print(f"wrote {path}")
    return path
