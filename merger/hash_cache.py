"""Input files are hashed once: a file's sha256 is kept under (host, device, inode) and reused while its
size and modification time (ns) are what they were when it was hashed.

A file changed in place keeps its inode but changes size or mtime, so it is hashed again. A file
modified less than ``RACY_SECONDS`` before it was hashed is not remembered: a further write within the
filesystem's timestamp granularity could leave its mtime unchanged.
"""

import os
import socket
import time
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from merger.db import FileHashRow
from merger.hashing import sha256_file

RACY_SECONDS = 2.0


class HashCache:
    def __init__(self, session: sessionmaker):
        self.session = session
        self.host = socket.gethostname()

    def sha256(self, path: Path) -> str:
        before = path.stat()
        key = f"{self.host}:{before.st_dev}:{before.st_ino}"
        with self.session() as s:
            row = s.get(FileHashRow, key)
            if row is not None and (row.size, row.mtime_ns) == (before.st_size, before.st_mtime_ns):
                return row.sha256
        started = time.time_ns()
        digest = sha256_file(path)
        after = path.stat()
        if _identity(after) == _identity(before) and started - after.st_mtime_ns > RACY_SECONDS * 1e9:
            self._remember(FileHashRow(file_key=key, size=after.st_size, mtime_ns=after.st_mtime_ns, sha256=digest))
        return digest

    def _remember(self, row: FileHashRow) -> None:
        try:
            with self.session.begin() as s:
                s.merge(row)
        except IntegrityError:  # another process remembered it at the same moment
            pass


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
