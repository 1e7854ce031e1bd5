"""Tickets on disk: the folder layout IMP writes, and ``load_ticket`` to restore one. Pure torch.

Layout of an IMP folder::

    rewind_point.pt          full state_dict at the rewind step k (shared by every level)
    rewind_optimizers.pt     with IMP(rewind_optimizer=True): the optimizers' state at step k
    levels.jsonl             one JSON line of metrics per trained level (rejected attempts included); each line ends
                             with ``"line_sha256": <SHA-256 of the line's JSON without that key>``
    level_<L>/mask.pt        {'level', 'density', 'masks'}: the mask level L was trained under
    level_<L>/trained.pt     state_dict of level L's trained network
    level_<L>/manifest.json  written last: sizes and SHA-256 of the level's files and of rewind_point.pt, the level,
                             its density, and the index and checksum of its levels.jsonl line

Every file is written atomically (:func:`atomic_write`: a temporary file in the same folder, flushed and fsynced, then
``os.replace``\\ d onto its name, and the folder fsynced): a crash leaves the old file or the new one, never a part.
:func:`verify_level` / :func:`verify_run` check a folder against its manifests before anything is unpickled;
:func:`load_ticket` calls it and then checks the mask itself (bool, 0/1 bytes only, shapes of the model).

A *ticket* is (mask of level L, rewind point): training it from step k reproduces level L.

IMP's checkpoints refer to the rewind point (and to the trained state of the last accepted level, ``trained.pt``)
by a :func:`file_reference` (path relative to the IMP folder and SHA-256) instead of holding the tensors;
:func:`read_reference` reads the file back and refuses it in one line if it is missing or its bytes changed. Masks go
into checkpoints bit-packed (:func:`pack_masks`, 1 bit per weight).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import IO, Any

import torch
from torch import nn

from composer_imp.functional.masks import apply_masks, density
from composer_imp.functional.rewind import rewind

__all__ = ['REWIND_POINT_FILE', 'LEVELS_FILE', 'MANIFEST_FILE', 'level_dir', 'save_level', 'save_rewind_point',
           'write_levels', 'write_manifest', 'read_levels', 'verify_level', 'verify_run', 'atomic_write',
           'atomic_save', 'load_ticket', 'REWIND_OPTIMIZERS_FILE', 'file_digest', 'file_reference', 'read_reference',
           'pack_masks', 'unpack_masks']

REWIND_POINT_FILE = 'rewind_point.pt'
REWIND_OPTIMIZERS_FILE = 'rewind_optimizers.pt'
LEVELS_FILE = 'levels.jsonl'
MANIFEST_FILE = 'manifest.json'
MANIFEST_FORMAT = 1
LINE_CHECKSUM_KEY = 'line_sha256'
_LINE_CHECKSUM = re.compile(r'^(?P<body>\{.*?)(?:, )?"' + LINE_CHECKSUM_KEY + r'": "(?P<sha>[0-9a-f]{64})"\}$')
_CHUNK = 1 << 20


def level_dir(folder: str, level: int) -> str:
    return os.path.join(folder, f'level_{level}')


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu() for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------------- atomic writes
def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform whose folders cannot be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - a file system that does not sync folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> str:
    """Write ``path`` through ``write(binary file)`` atomically: into a temporary file in the same folder, flushed
    and ``os.fsync``\\ ed, then ``os.replace``\\ d onto ``path`` and the folder fsynced. A failure (or a crash) at any
    point leaves the previous ``path`` as it was and no partial file under its name; the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)
    return path


def atomic_save(obj: Any, path: str) -> str:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_text(path: str, text: str) -> str:
    return atomic_write(path, lambda f: f.write(text.encode('utf-8')))


# ---------------------------------------------------------------------------------------------------- writing
def save_rewind_point(folder: str, rewind_point: dict[str, torch.Tensor], rewind_batch: int) -> str:
    path = os.path.join(folder, REWIND_POINT_FILE)
    return atomic_save({'rewind_batch': rewind_batch, 'state_dict': _cpu(rewind_point)}, path)


def save_level(folder: str, level: int, masks: dict[str, torch.Tensor], trained_state: dict[str, torch.Tensor],
               manifest: bool = True) -> str:
    """Write ``level_<L>/mask.pt`` and ``level_<L>/trained.pt`` (atomically) and, unless ``manifest=False`` (IMP
    writes it itself after ``levels.jsonl``), ``level_<L>/manifest.json`` last."""
    path = level_dir(folder, level)
    atomic_save({'level': level, 'density': density(masks), 'masks': _cpu(masks)}, os.path.join(path, 'mask.pt'))
    atomic_save(_cpu(trained_state), os.path.join(path, 'trained.pt'))
    if manifest:
        write_manifest(folder, level, density(masks))
    return path


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def levels_line(record: dict[str, Any]) -> str:
    """The line of ``levels.jsonl`` for ``record`` (no newline): its JSON with ``"line_sha256"`` (SHA-256 of the
    JSON without that key) appended as the last key."""
    body = json.dumps(record, default=float)
    sha = _sha256(body)
    return (body[:-1] + (', ' if body != '{}' else '') + f'"{LINE_CHECKSUM_KEY}": "{sha}"}}')


def write_levels(folder: str, records: Sequence[dict[str, Any]]) -> str:
    """Write ``levels.jsonl`` (atomically, whole): one checksummed line per record."""
    return _atomic_text(os.path.join(folder, LEVELS_FILE), ''.join(levels_line(r) + '\n' for r in records))


def file_digest(path: str) -> dict[str, Any]:
    """``{'bytes', 'sha256'}`` of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
            size += len(chunk)
    return {'bytes': size, 'sha256': digest.hexdigest()}


def write_manifest(folder: str, level: int, level_density: float, record: dict[str, Any] | None = None,
                   line_index: int | None = None) -> str:
    """Write ``level_<L>/manifest.json`` (atomically; after the level's files): ``format``, ``level``, ``density``,
    ``files`` (``{path relative to the IMP folder: {'bytes', 'sha256'}}`` for ``level_<L>/mask.pt``,
    ``level_<L>/trained.pt`` and ``rewind_point.pt`` when present) and, given the level's ``record``, ``levels_line``:
    ``{'index': its 0-based line in levels.jsonl, 'sha256': the line's checksum}``."""
    names = [f'level_{level}/mask.pt', f'level_{level}/trained.pt', REWIND_POINT_FILE]
    files = {name: file_digest(os.path.join(folder, name)) for name in names
             if name != REWIND_POINT_FILE or os.path.isfile(os.path.join(folder, name))}
    manifest: dict[str, Any] = {'format': MANIFEST_FORMAT, 'level': int(level), 'density': float(level_density),
                                'files': files}
    if record is not None:
        manifest['levels_line'] = {'index': line_index, 'sha256': _sha256(json.dumps(record, default=float))}
    path = os.path.join(level_dir(folder, level), MANIFEST_FILE)
    return _atomic_text(path, json.dumps(manifest, indent=1) + '\n')


# ---------------------------------------------------------------------------------------------------- references
def file_reference(folder: str, relative_path: str, key: str | None = None, sha256: str | None = None
                   ) -> dict[str, Any]:
    """``{'path': relative_path, 'sha256', 'key', 'folder'}`` for a file of the IMP ``folder`` (``key``: the entry of
    the saved dict that holds the tensors, ``None`` for the whole file; ``folder``: the folder's absolute path, where a
    run loading the checkpoint into another folder finds the file). ``sha256`` when already known (from a manifest)."""
    if sha256 is None:
        sha256 = file_digest(os.path.join(folder, relative_path))['sha256']
    return {'path': relative_path, 'sha256': sha256, 'key': key, 'folder': os.path.abspath(folder)}


def read_reference(folder: str, reference: dict[str, Any], what: str) -> tuple[Any, str]:
    """The object a :func:`file_reference` names and the folder it was read from: ``folder`` (the IMP folder of the
    run now), else the folder the reference recorded. Loaded on the CPU (``weights_only``) after its SHA-256 is
    checked; raises ``ValueError`` in one line naming the file and ``what`` it holds if it is missing, changed or
    unreadable.
    """
    path = os.path.join(folder, reference['path'])
    advice = ("restore it from the run's IMP folder (or resume with IMP(folder=...) naming that folder)")
    if not os.path.isfile(path) and reference.get('folder'):
        recorded = os.path.join(reference['folder'], reference['path'])
        if os.path.isfile(recorded):
            folder, path = reference['folder'], recorded
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: IMP's {what} is stored in {path}, which is missing; {advice}")
    with open(path, 'rb') as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != reference['sha256']:
        raise ValueError(f"checkpoint: IMP's {what} file {path} does not have the SHA-256 the checkpoint recorded "
                         f"(overwritten or corrupted); {advice}")
    try:
        loaded = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one line
        raise ValueError(f"checkpoint: IMP's {what} file {path} cannot be read ({type(error).__name__}); "
                         f'{advice}') from None
    return (loaded if reference.get('key') is None else loaded[reference['key']]), folder


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_masks(masks: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Bool masks as ``{name: {'shape': [...], 'bits': uint8 tensor}}``, 8 weights per byte, on the CPU."""
    packed = {}
    for name, mask in masks.items():
        flat = mask.detach().flatten().cpu()
        padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8)
        padded[:flat.numel()] = flat
        bits = (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)
        packed[name] = {'shape': list(mask.shape), 'bits': bits}
    return packed


def unpack_masks(packed: dict[str, dict[str, Any]],
                 device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The bool masks :func:`pack_masks` packed, on ``device``."""
    masks = {}
    for name, entry in packed.items():
        numel = 1
        for size in entry['shape']:
            numel *= int(size)
        bits = (entry['bits'].cpu().view(-1, 1) & _BIT_WEIGHTS) != 0
        masks[name] = bits.flatten()[:numel].view(entry['shape']).to(device)
    return masks


# ---------------------------------------------------------------------------------------------------- verifying
_warned_legacy: set[str] = set()


def _legacy_warning(what: str, folder: str) -> None:
    key = os.path.abspath(folder)
    if key in _warned_legacy:
        return
    _warned_legacy.add(key)
    warnings.warn(f'{folder}: written before IMP recorded manifests and checksums; {what} not verified (sizes, '
                  'SHA-256 and levels.jsonl checksums are checked only for runs written by this version)')


def read_levels(folder: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """``levels.jsonl`` of an IMP folder: ``(records, line checksums, problems)``.

    ``records`` holds every line that parses and whose checksum (if any) matches, without the checksum key;
    ``problems`` one line per damaged line (torn, not JSON, checksum mismatch, checksum missing among checksummed
    lines), naming the line and what to do. Lines without checksums in a file that has none (a run written before
    checksums) are accepted with a one-time warning. A missing file gives ``([], [], [])``.
    """
    path = os.path.join(folder, LEVELS_FILE)
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            lines = f.read().splitlines()
    except OSError:
        return [], [], []
    records, sums, problems, legacy = [], [], [], []
    advice = ('re-run the level, or restore levels.jsonl from a backup (the run\'s checkpoint holds its history: '
              'resuming rewrites the file)')
    checksummed = any(f'"{LINE_CHECKSUM_KEY}": "' in line for line in lines)
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        where = f'{LEVELS_FILE} line {number}'
        match = _LINE_CHECKSUM.match(text)
        if match is None:
            try:
                record = json.loads(text)
            except ValueError:
                problems.append(f'{where}: not valid JSON ({len(text)} characters; torn by a crash while writing?); '
                                f'this record is not reported; {advice}')
                continue
            if checksummed or not isinstance(record, dict):
                problems.append(f'{where}: has no {LINE_CHECKSUM_KEY} while the other lines do (edited?); '
                                f'this record is not reported; {advice}')
                continue
            legacy.append(number)
            records.append(record)
            sums.append(_sha256(json.dumps(record, default=float)))
            continue
        body = match.group('body')
        body = body + '}' if body != '{' else '{}'
        if _sha256(body) != match.group('sha'):
            problems.append(f'{where}: its content does not match its {LINE_CHECKSUM_KEY} (edited or corrupted?); '
                            f'this record is not reported; {advice}')
            continue
        try:
            record = json.loads(body)
        except ValueError:  # pragma: no cover - a checksum of invalid JSON is never written
            problems.append(f'{where}: not valid JSON; this record is not reported; {advice}')
            continue
        records.append(record)
        sums.append(match.group('sha'))
    if legacy and not problems:
        _legacy_warning(f'{LEVELS_FILE} ({len(legacy)} lines without checksums)', folder)
    return records, sums, problems


def _is_checksummed(folder: str) -> bool:
    try:
        with open(os.path.join(folder, LEVELS_FILE), encoding='utf-8', errors='replace') as f:
            return f'"{LINE_CHECKSUM_KEY}": "' in f.read()
    except OSError:
        return False


def _fmt_bytes(n: int) -> str:
    return f'{n:,} bytes'


def verify_level(folder: str, level: int, raise_error: bool = False, line_sums: Sequence[str] | None = None,
                 legacy_warning: bool = True) -> list[str]:
    """Check ``level_<L>`` of an IMP folder against its ``manifest.json``, reading bytes only (nothing unpickled).

    Returns one line per problem (``level_2/trained.pt: 1,204 bytes, the manifest says 9,877 (truncated?); re-run the
    level or delete level_2 and resume``), or raises the first as ``ValueError`` with ``raise_error=True``. Checks:
    the folder and each file exist; sizes and SHA-256 of ``mask.pt``, ``trained.pt`` and the shared
    ``rewind_point.pt``; the manifest's level; with ``line_sums`` (the checksums of levels.jsonl's lines, from
    :func:`read_levels`), that the level's line is there unchanged. A level folder without a manifest (written
    before manifests) passes with a one-time warning naming what is not verified.
    """
    name = f'level_{level}'
    path = level_dir(folder, level)
    fix = f're-run the level or delete {name} and resume'
    problems: list[str] = []
    if not os.path.isdir(path):
        problems.append(f'{name}: the folder is missing from {folder} although the run recorded this level; '
                        f'restore it, or delete the level\'s line from {LEVELS_FILE} and resume')
    else:
        manifest_path = os.path.join(path, MANIFEST_FILE)
        if not os.path.isfile(manifest_path):
            missing = [f for f in ('mask.pt', 'trained.pt') if not os.path.isfile(os.path.join(path, f))]
            if missing:
                problems.append(f'{name}/{missing[0]}: missing; {fix}')
            elif legacy_warning:
                _legacy_warning(f'{name} and later levels (no {MANIFEST_FILE}: sizes and SHA-256 of mask.pt, '
                                f'trained.pt and {REWIND_POINT_FILE})', folder)
        else:
            try:
                with open(manifest_path, encoding='utf-8') as f:
                    manifest = json.load(f)
                files = manifest['files']
                assert isinstance(files, dict)
            except (OSError, ValueError, KeyError, TypeError, AssertionError):
                manifest, files = None, {}
                problems.append(f'{name}/{MANIFEST_FILE}: not a readable manifest (damaged?); {fix}')
            if manifest is not None and manifest.get('level') != level:
                problems.append(f'{name}/{MANIFEST_FILE}: describes level {manifest.get("level")!r}, not {level} '
                                f'(copied from another level?); {fix}')
            for rel, expected in files.items():
                file_path = os.path.join(folder, rel)
                what_to_do = (f'restore {REWIND_POINT_FILE}, or start the run again: every level\'s ticket needs it'
                              if rel == REWIND_POINT_FILE else fix)
                if not os.path.isfile(file_path):
                    problems.append(f'{rel}: missing, the manifest of {name} lists it; {what_to_do}')
                    continue
                size = os.path.getsize(file_path)
                if size != expected.get('bytes'):
                    hint = 'truncated?' if size < int(expected.get('bytes') or 0) else 'overwritten?'
                    problems.append(f'{rel}: {_fmt_bytes(size)}, the manifest says {expected.get("bytes"):,} '
                                    f'({hint}); {what_to_do}')
                elif file_digest(file_path)['sha256'] != expected.get('sha256'):
                    problems.append(f'{rel}: its SHA-256 differs from the manifest of {name} (corrupted or edited); '
                                    f'{what_to_do}')
            line = (manifest or {}).get('levels_line')
            if line_sums is not None and isinstance(line, dict) and line.get('sha256') not in line_sums:
                problems.append(f'{LEVELS_FILE}: the line of level {level} (line {int(line.get("index") or 0) + 1} '
                                f'when written) is missing or changed; {fix}')
    if problems and raise_error:
        raise ValueError(problems[0])
    return problems


def verify_run(folder: str) -> dict[str, Any]:
    """Check a whole IMP folder: ``levels.jsonl`` line by line, and every accepted level it lists with
    :func:`verify_level`. Returns ``{'records', 'problems', 'damaged_levels', 'missing_levels'}``: the intact records,
    one line per problem, the levels whose files fail and the levels whose folder is gone."""
    records, sums, problems = read_levels(folder)
    damaged, missing, warned = [], [], False
    listed = sorted({int(r['level']) for r in records
                     if r.get('accepted', True) and isinstance(r.get('level'), (int, float))})
    legacy_lines = not any(os.path.isfile(os.path.join(level_dir(folder, level), MANIFEST_FILE)) for level in listed) \
        and len(sums) == len(records) and records and not _is_checksummed(folder)
    if legacy_lines and not any(os.path.isdir(level_dir(folder, level)) for level in listed):
        # levels.jsonl of an old run without its level folders (a copied record): nothing to check the files of
        _legacy_warning(f'the level folders (none is here: only {LEVELS_FILE})', folder)
        listed = []
    for level in listed:
        found = verify_level(folder, level, line_sums=sums, legacy_warning=not warned)
        warned = warned or not os.path.isfile(os.path.join(level_dir(folder, level), MANIFEST_FILE))
        if found:
            (missing if not os.path.isdir(level_dir(folder, level)) else damaged).append(level)
            problems += found
    return {'records': records, 'problems': problems, 'damaged_levels': damaged, 'missing_levels': missing}


def _check_masks(mask_path: str, masks: Any) -> None:
    if not isinstance(masks, dict):
        raise ValueError(f'{mask_path}: holds no dict of masks ({type(masks).__name__}); re-run the level')
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f'{mask_path}: mask {name!r} is {kind}, not a bool tensor; re-run the level')
        if mask.numel() and int(mask.view(torch.uint8).max()) > 1:
            bad = int((mask.view(torch.uint8) > 1).sum())
            raise ValueError(f'{mask_path}: mask {name!r} holds {bad:,} bytes that are neither 0 nor 1 (corrupted); '
                             're-run the level or delete its folder and resume')


def load_ticket(path: str, model: nn.Module | None = None) -> dict[str, Any]:
    """Load the ticket of a level folder (``.../level_<L>``) and, if ``model`` is given, rewind it to the ticket.

    Returns ``{'level', 'density', 'masks', 'rewind_point', 'rewind_batch'}``. The model gets the rewind point with the
    mask applied (pruned weights exactly 0). Before anything is unpickled the folder is checked against its
    ``manifest.json`` (:func:`verify_level`: sizes, SHA-256, the level's line of ``levels.jsonl``); then the masks
    must be bool tensors holding only 0/1 bytes, of the model's shapes. Raises ``ValueError`` in one line naming the
    file and what to do when a file is missing, damaged or does not fit.
    """
    mask_path = os.path.join(path, 'mask.pt')
    folder = os.path.dirname(os.path.normpath(path))
    rewind_path = os.path.join(folder, REWIND_POINT_FILE)
    for required in (mask_path, rewind_path):
        if not os.path.isfile(required):
            raise ValueError(f'path: {required} does not exist; pass a level folder (.../imp/level_<L>) written by IMP')
    level = _folder_level(path)
    if level is not None:
        sums = read_levels(folder)[1] if os.path.isfile(os.path.join(folder, LEVELS_FILE)) else None
        verify_level(folder, level, raise_error=True, line_sums=sums)
    try:
        mask_file = torch.load(mask_path, map_location='cpu', weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one line
        raise ValueError(f'{mask_path}: cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}); '
                         're-run the level or delete its folder and resume') from None
    try:
        rewind_file = torch.load(rewind_path, map_location='cpu', weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f'{rewind_path}: cannot be read ({type(error).__name__}: '
                         f'{str(error).splitlines()[0][:200]}); restore it or start the run again') from None
    if not isinstance(mask_file, dict) or not {'level', 'density', 'masks'} <= set(mask_file):
        raise ValueError(f'{mask_path}: is not a mask file written by IMP (no level/density/masks); re-run the level')
    if not isinstance(rewind_file, dict) or not {'state_dict', 'rewind_batch'} <= set(rewind_file):
        raise ValueError(f'{rewind_path}: is not a rewind point written by IMP; restore it or start the run again')
    _check_masks(mask_path, mask_file['masks'])
    ticket = {
        'level': mask_file['level'],
        'density': mask_file['density'],
        'masks': mask_file['masks'],
        'rewind_point': rewind_file['state_dict'],
        'rewind_batch': rewind_file['rewind_batch'],
    }
    measured = density(ticket['masks']) if ticket['masks'] else None
    if measured is not None and abs(measured - float(ticket['density'])) > 1e-6:
        raise ValueError(f'{mask_path}: its masks keep {measured:.6g} of the weights, the file says '
                         f'{float(ticket["density"]):.6g} (corrupted?); re-run the level or delete its folder and '
                         'resume')
    if model is not None:
        params = dict(model.named_parameters())
        for name, mask in ticket['masks'].items():
            if name not in params or params[name].shape != mask.shape:
                raise ValueError(f'{mask_path}: mask {name!r} {tuple(mask.shape)} does not fit the model '
                                 f'({tuple(params[name].shape) if name in params else "no such parameter"})')
        rewind(model, ticket['rewind_point'])
        apply_masks(model, {n: m.to(params[n].device) for n, m in ticket['masks'].items()})
    return ticket


def _folder_level(path: str) -> int | None:
    """The level of a level folder: the ``<L>`` of ``level_<L>``, else its manifest's, else None (not verified)."""
    match = re.fullmatch(r'level_(\d+)', os.path.basename(os.path.normpath(path)))
    if match:
        return int(match.group(1))
    try:
        with open(os.path.join(path, MANIFEST_FILE), encoding='utf-8') as f:
            level = json.load(f).get('level')
        return level if isinstance(level, int) and os.path.samefile(level_dir(os.path.dirname(
            os.path.normpath(path)), level), path) else None
    except (OSError, ValueError, AttributeError):
        return None
