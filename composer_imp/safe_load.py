"""Loading that runs nothing: CIFAR's python-pickle batches and Composer checkpoints are checked before they are read.

- :func:`load_cifar_batch` reads one CIFAR batch with an unpickler that resolves only the globals such a file holds
  (numpy arrays, dtypes and scalars; bytes as Python 3 writes them at protocol 2); anything else raises ``ValueError``
  naming the file and the global, before any of it is called.
- :func:`check_checkpoint` loads a Composer checkpoint with ``torch.load(weights_only=True)`` inside
  ``torch.serialization.safe_globals(CHECKPOINT_GLOBALS)``, so that Composer's own loader (which calls
  ``torch.load(weights_only=False)``) only ever sees a file that holds tensors and plain data.
  :func:`composer_imp.recipes.build_trainer` calls it for ``load_path`` and for autoresume's latest checkpoint.
"""
from __future__ import annotations

import codecs
import datetime
import os
import pickle
from typing import Any

import numpy as np

__all__ = ['CHECKPOINT_GLOBALS', 'UnsafeFileError', 'check_checkpoint', 'load_cifar_batch', 'checkpoint_globals']


class UnsafeFileError(ValueError):
    """A file that would run code (or is not in the expected format) when loaded; one line naming file and global."""


def _numpy_core() -> Any:
    try:
        from numpy import _core as core  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy import core
    return core


def _shown(module: str, name: str) -> str:
    """``module.name`` as a user reads it: ``os.system`` pickles as ``posix.system`` (``nt.system`` on Windows)."""
    if module in ('posix', 'nt') and hasattr(os, name):
        return f'os.{name}'
    return f'{module}.{name}'


# ---------------------------------------------------------------------------------------------------- CIFAR batches
def _cifar_globals() -> dict[tuple[str, str], Any]:
    core = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {
        ('numpy', 'ndarray'): np.ndarray,
        ('numpy', 'dtype'): np.dtype,
        ('_codecs', 'encode'): codecs.encode,  # how Python 3 writes bytes at protocol <= 2
    }
    for package in ('numpy.core', 'numpy._core'):  # written by numpy 1.x / 2.x (the real files: numpy 1.x, Python 2)
        allowed[(f'{package}.multiarray', '_reconstruct')] = core.multiarray._reconstruct
        allowed[(f'{package}.multiarray', 'scalar')] = core.multiarray.scalar
        allowed[(f'{package}.numeric', '_frombuffer')] = core.numeric._frombuffer  # protocol 5 arrays
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR python batch holds; dicts, lists, strings, bytes and numbers need none."""

    allowed = _cifar_globals()

    def __init__(self, file: Any, path: str):
        super().__init__(file, encoding='latin1')  # the real batches were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeFileError(f'{self.path} is not a CIFAR python batch: it holds {_shown(module, name)}, which '
                                  'such a batch never does; it was not loaded') from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f'{self.path} is not a CIFAR python batch: it holds a persistent id; it was not loaded')


def load_cifar_batch(path: str | os.PathLike) -> dict:
    """One CIFAR batch (``data_batch_1``, ``test_batch``, CIFAR-100's ``train``, ...) as the dict it holds, read
    without running anything: a global other than numpy's array pieces raises :class:`UnsafeFileError`."""
    path = os.fspath(path)
    with open(path, 'rb') as f:
        try:
            entry = _CifarUnpickler(f, path).load()
        except UnsafeFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            message = ' '.join(str(error).split()) or type(error).__name__
            raise UnsafeFileError(f'{path} is not a CIFAR python batch: {message}') from error
    if not isinstance(entry, dict):
        raise UnsafeFileError(f'{path} is not a CIFAR python batch: it holds a {type(entry).__name__}, not a dict')
    return entry


# ---------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_globals() -> list:
    """The globals a composer_imp checkpoint (Composer 0.32.1) holds beyond what ``weights_only=True`` allows by
    default, found by saving real recipe runs and listing them with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``:

    - ``datetime.timedelta``: the Trainer's timestamp (``total_wct``, ``epoch_wct``, ...);
    - ``numpy`` ``_reconstruct``, ``ndarray``, ``dtype``, ``dtypes.UInt32DType``: the numpy RNG state
      (``np.random.get_state()``, an MT19937 ``uint32`` array) in the checkpoint's ``rng`` list;
    - ``torch.torch_version.TorchVersion``: the torch version in the checkpoint's metadata.

    Tensors, ``OrderedDict`` state dicts, numbers, strings, lists and dicts (all of IMP's own state, including its
    component snapshot: a ``uint8`` tensor and a list of tensors) need nothing beyond the default.
    """
    import torch

    core = _numpy_core()
    found = [datetime.timedelta, core.multiarray._reconstruct, np.ndarray, np.dtype, torch.torch_version.TorchVersion]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes through their classes
        found.append(dtypes.UInt32DType)
    return found


CHECKPOINT_GLOBALS = checkpoint_globals()


def _allowed_names() -> set[str]:
    names = set()
    for obj in CHECKPOINT_GLOBALS:
        names.add(f'{obj.__module__}.{getattr(obj, "__qualname__", obj.__name__)}')
    names.add('numpy.core.multiarray._reconstruct')
    names.add('numpy._core.multiarray._reconstruct')
    return names


def _refusal(path: str, error: BaseException) -> str:
    """What is wrong with ``path``: the first global that is not allowed, named as the user reads it, else torch's
    own reason."""
    import re

    import torch

    try:
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in _allowed_names()]
    except Exception:  # noqa: BLE001 - not a zip checkpoint: fall back to torch's message
        unsafe = []
    if unsafe:
        module, _, name = unsafe[0].rpartition('.')
        return f'it holds {_shown(module, name)}, which torch.load(weights_only=True) does not allow'
    message = str(error)
    match = re.search(r'GLOBAL ([\w.]+)', message) or re.search(r"but got <class '([\w.]+)'>", message)
    if match:
        module, _, name = match.group(1).rpartition('.')
        return f'it holds {_shown(module, name)}, which torch.load(weights_only=True) does not allow'
    reason = ' '.join(message.split())[:300]
    return f'torch.load(weights_only=True) cannot read it ({type(error).__name__}{": " + reason if reason else ""})'


def check_checkpoint(path: str | os.PathLike, what: str = 'checkpoint') -> None:
    """Load the Composer checkpoint at ``path`` with ``torch.load(weights_only=True)`` and exactly the globals of
    :data:`CHECKPOINT_GLOBALS`; raise :class:`UnsafeFileError` (one line naming ``path`` and the offending global) if
    it holds anything else. Nothing in the file is called. ``what`` names the file's role in the message."""
    import torch

    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # noqa: BLE001 - every refusal is one line
        raise UnsafeFileError(f'{what} {path} is not a safe composer_imp checkpoint: {_refusal(path, error)}; '
                              'it was not loaded') from None
