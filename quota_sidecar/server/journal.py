"""The degraded journal as a file: JSON lines, each appended and fsynced before the caller is
answered; rewritten whole (write, fsync, rename) once Redis has some of them. Implements
quota_sidecar.domain.degraded.Journal."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import Iterable, Iterator

from quota_sidecar.domain.degraded import DegradedReservation

log = logging.getLogger("quota_sidecar.degraded")


class FileJournal:
    def __init__(self, path: str) -> None:
        self.path = path

    def append(self, res: DegradedReservation) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as journal:
            journal.write(json.dumps(asdict(res), separators=(",", ":")) + "\n")
            journal.flush()
            os.fsync(journal.fileno())

    def rewrite(self, pending: Iterable[DegradedReservation]) -> None:
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as journal:
            for res in pending:
                journal.write(json.dumps(asdict(res), separators=(",", ":")) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        os.replace(temporary, self.path)

    def load(self) -> Iterator[DegradedReservation]:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as journal:
            for number, line in enumerate(journal, 1):
                try:
                    yield DegradedReservation(**json.loads(line))
                except (ValueError, TypeError):
                    log.warning("degraded journal %s line %d unreadable (a torn write?); skipped", self.path, number)
