"""A file object that fills up: what the full-disk tests of atomic writes and checkpoints give torch's writer, in
the test process and in the tool run by tests/engine/test_checkpoint_errors.py's driver script."""

import errno
import io


class FullAfter(io.RawIOBase):
    """A file that takes `limit` bytes, then fails as a write to a full disk does (what torch's zip writer then
    reports as `unexpected pos`)."""

    def __init__(self, stream, limit: int):
        self.stream, self.limit, self.written = stream, limit, 0

    def writable(self):
        return True

    def write(self, data):
        if self.written + len(data) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.stream.write(data)

    def fileno(self):
        return self.stream.fileno()

    def flush(self):
        self.stream.flush()

    def close(self):
        if not self.closed:
            super().close()  # flushes
            self.stream.close()
