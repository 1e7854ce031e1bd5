"""Fixtures shared by several test files."""
import tempfile

import pytest


@pytest.fixture
def streaming_env(tmp_path, monkeypatch):
    """Streaming's gotchas: stale shared memory from earlier runs, and file locks in the global temp dir."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    lock_dir = tmp_path / 'tmp'
    lock_dir.mkdir()
    monkeypatch.setenv('TMPDIR', str(lock_dir))
    monkeypatch.setattr(tempfile, 'tempdir', str(lock_dir))
    return tmp_path
