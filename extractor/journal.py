"""The resume journal: one JSON line per store file, appended after its atomic rename.

A record says "this file, written for plan P, had this size and sha256". A resumed run
reuses a file only if the record's plan is its own and the file still hashes to the
record, so a record is never trusted on its own, and a torn last line (kill -9 mid
write) is simply ignored.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from .errors import ExtractError
from .writer import FileRecord

JOURNAL = ".extract-journal.jsonl"


class Journal:
    def __init__(self, out_dir: Path):
        self.path = out_dir / JOURNAL
        self._lock = threading.Lock()
        self._fd: int | None = None

    def lines(self) -> list[dict]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        parsed = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a kill mid-append
            if isinstance(entry, dict):
                parsed.append(entry)
        return parsed

    def config_hashes(self) -> set[str]:
        return {entry["config_sha256"] for entry in self.lines() if "config_sha256" in entry}

    def records(self, plan: str) -> dict[str, FileRecord]:
        """Latest record per file written for `plan`."""
        found = {}
        for entry in self.lines():
            if entry.get("plan") == plan and "path" in entry:
                try:
                    found[entry["path"]] = FileRecord(int(entry["bytes"]), str(entry["sha256"]), entry.get("tensor_bytes"))
                except (KeyError, TypeError, ValueError):
                    continue
        return found

    def open_run(self, config_sha256: str, plan: str) -> None:
        """Lock the journal for this process (a second extractor on the same store fails
        fast instead of interleaving writes) and mark the start of a run."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise ExtractError(f"{self.path.parent}: another extraction is writing this store") from None
        self._append({"run": "start", "config_sha256": config_sha256, "plan": plan})

    def record(self, plan: str, relpath: str, record: FileRecord) -> None:
        self._append({"plan": plan, "path": relpath, **record.to_json()})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def _append(self, entry: dict) -> None:
        # one write() per line on an O_APPEND descriptor: lines from several threads never interleave
        with self._lock:
            os.write(self._fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())
