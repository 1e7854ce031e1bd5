"""IMP's files are written atomically and verified on load: manifests, checksummed levels.jsonl lines, mask content."""
import json
import os
import shutil
import warnings

import pytest
import torch
import yaml
from composer import Trainer
from composer.optim import CosineAnnealingScheduler

from composer_imp import IMP, cli, load_ticket
from composer_imp.functional import ticket as ticket_mod
from composer_imp.functional.ticket import MANIFEST_FILE, atomic_save, verify_run, write_levels
from composer_imp.report import build_report
from helpers import digits_loader, mlp


@pytest.fixture(scope='module')
def intact(tmp_path_factory):
    """A finished 2-level IMP run (6 + 4 + 4 steps): ``<base>/run/imp``. Tests copy it before damaging it."""
    base = tmp_path_factory.mktemp('artefacts')
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(model=model, train_dataloader=digits_loader(), eval_dataloader=digits_loader('test'),
                      max_duration='6ba', optimizers=opt, schedulers=[CosineAnnealingScheduler()],
                      algorithms=[IMP(levels=2, rewind_to='2ba', folder=str(base / 'run' / 'imp'))],
                      progress_bar=False, seed=7, device='cpu')
    trainer.fit()
    trainer.close()
    return str(base / 'run')


@pytest.fixture
def run(intact, tmp_path):
    copy = str(tmp_path / 'run')
    shutil.copytree(intact, copy)
    return copy


def imp(run, *parts):
    return os.path.join(run, 'imp', *parts)


def report_of(run):
    with open(build_report(run)) as f:
        return f.read()


def damage_section(report):
    return report.split('## Damaged or missing artefacts', 1)[1].split('\n## ', 1)[0] if \
        '## Damaged or missing artefacts' in report else ''


# ---------------------------------------------------------------------------------------------------- intact
def test_an_intact_run_has_manifests_checksummed_lines_and_a_report_that_says_nothing_new(run):
    manifest = json.load(open(imp(run, 'level_1', MANIFEST_FILE)))
    assert manifest['level'] == 1 and 0.7 < manifest['density'] < 0.9
    assert set(manifest['files']) == {'level_1/mask.pt', 'level_1/trained.pt', 'rewind_point.pt'}
    assert manifest['files']['level_1/trained.pt']['bytes'] == os.path.getsize(imp(run, 'level_1', 'trained.pt'))
    assert manifest['levels_line']['index'] == 1
    lines = open(imp(run, 'levels.jsonl')).read().splitlines()
    assert len(lines) == 3 and all('"line_sha256": "' in line for line in lines)
    assert not [f for f in os.listdir(imp(run)) + os.listdir(imp(run, 'level_1')) if f.endswith('.tmp')]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no legacy warning for a run written by this version
        checked = verify_run(imp(run))
        assert checked['problems'] == [] and [r['level'] for r in checked['records']] == [0, 1, 2]
        assert 'line_sha256' not in checked['records'][0]
        report = report_of(run)
        ticket = load_ticket(imp(run, 'level_2'), mlp())
    assert ticket['level'] == 2
    assert 'Artefacts' not in report and 'damaged' not in report.lower() and 'missing' not in report.lower()
    assert '| 2 |' in report


# ---------------------------------------------------------------------------------------------------- damage
def _garble_mask_bytes(path, name):
    """Rewrite the bytes of the bool tensor ``name`` in place (0/1 -> 2/3, same length): the pickle stays readable."""
    mask = torch.load(path, weights_only=True)['masks'][name]
    payload = mask.numpy().tobytes()
    data = open(path, 'rb').read()
    at = data.find(payload)
    assert at > 0 and data.count(payload) == 1
    garbled = bytes(b + 2 for b in payload)
    with open(path, 'wb') as f:
        f.write(data[:at] + garbled + data[at + len(payload):])


def test_a_garbled_mask_is_refused_before_it_is_unpickled_and_the_report_marks_the_level(run, monkeypatch):
    name = 'module.0.weight'
    _garble_mask_bytes(imp(run, 'level_1', 'mask.pt'), name)
    loads = []
    monkeypatch.setattr(ticket_mod.torch, 'load', lambda *a, **k: loads.append(a) or pytest.fail('unpickled'))
    with pytest.raises(ValueError) as error:
        load_ticket(imp(run, 'level_1'))
    assert str(error.value) == ('level_1/mask.pt: its SHA-256 differs from the manifest of level_1 (corrupted or '
                                'edited); re-run the level or delete level_1 and resume')
    assert loads == []
    monkeypatch.undo()
    report = report_of(run)
    assert '- **Artefacts: DAMAGED** — 1 problem; damaged level 1' in report
    assert str(error.value) in damage_section(report)
    assert '| 1 (damaged) |' in report and '| 2 |' in report


def test_a_garbled_mask_of_a_run_without_manifests_is_caught_by_its_content(run):
    _garble_mask_bytes(imp(run, 'level_1', 'mask.pt'), 'module.0.weight')
    assert torch.load(imp(run, 'level_1', 'mask.pt'), weights_only=True)['masks']['module.0.weight'].view(
        torch.uint8).max() > 1  # what used to load silently
    for level in range(3):
        os.remove(imp(run, f'level_{level}', MANIFEST_FILE))
    ticket_mod._warned_legacy.clear()
    with pytest.warns(UserWarning, match=r'manifest.*not verified'):
        with pytest.raises(ValueError, match=r"^.*level_1/mask.pt: mask 'module.0.weight' holds [\d,]+ bytes that "
                                             r'are neither 0 nor 1 \(corrupted\); re-run the level'):
            load_ticket(imp(run, 'level_1'))


def test_a_truncated_trained_file_is_named_with_both_sizes(run):
    path = imp(run, 'level_2', 'trained.pt')
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(1204)
    expected = (f'level_2/trained.pt: 1,204 bytes, the manifest says {size:,} (truncated?); re-run the level or '
                'delete level_2 and resume')
    with pytest.raises(ValueError) as error:
        load_ticket(imp(run, 'level_2'))
    assert str(error.value) == expected
    report = report_of(run)
    assert f'- {expected}' in damage_section(report) and '| 2 (damaged) |' in report


def test_a_deleted_level_folder_is_reported_missing(run):
    shutil.rmtree(imp(run, 'level_1'))
    report = report_of(run)
    assert 'missing level folder 1' in report
    assert 'level_1: the folder is missing' in damage_section(report)
    assert '| 1 (missing) |' in report and '| 2 |' in report
    with pytest.raises(ValueError, match='level_1/mask.pt does not exist'):
        load_ticket(imp(run, 'level_1'))


def test_a_torn_last_line_is_reported_not_dropped(run):
    path = imp(run, 'levels.jsonl')
    text = open(path).read()
    open(path, 'w').write(text[:-40])  # the last line loses its end (and its newline)
    report = report_of(run)
    section = damage_section(report)
    assert 'levels.jsonl line 3: not valid JSON' in section and 'torn' in section
    assert section.count('\n- ') == 1  # level 2's files are intact: only its record is damaged
    table = report.split('## Levels', 1)[1].split('## Compute', 1)[0]
    assert '\n| 1 |' in table and '\n| 2 ' not in table
    with pytest.raises(ValueError, match=r'^levels.jsonl: the line of level 2 \(line 3 when written\) is missing or '
                                         r'changed'):
        load_ticket(imp(run, 'level_2'))
    assert load_ticket(imp(run, 'level_1'))['level'] == 1  # other levels still load


def test_an_edited_number_in_a_line_is_detected(run):
    path = imp(run, 'levels.jsonl')
    lines = open(path).read().splitlines()
    record = json.loads(lines[1])
    old = f'"samples": {record["samples"]}'
    assert lines[1].count(old) == 1
    lines[1] = lines[1].replace(old, f'"samples": {record["samples"] + 1}')
    open(path, 'w').write('\n'.join(lines) + '\n')
    checked = verify_run(imp(run))
    assert checked['problems'][0].startswith('levels.jsonl line 2: its content does not match its line_sha256 '
                                             '(edited or corrupted?)')
    assert [r['level'] for r in checked['records']] == [0, 2]
    assert 'levels.jsonl line 2: its content does not match' in damage_section(report_of(run))


def test_instability_refuses_a_damaged_ticket_in_one_line(run, capsys):
    with open(os.path.join(run, 'recipe.yaml'), 'w') as f:  # what `composer-imp run` would have written
        yaml.safe_dump({'seed': 7, 'model': {'name': 'lenet_300_100'},
                        'train_loader': {'name': 'mnist-5k', 'batch_size': 32, 'limit': 64},
                        'optimizer': {'name': 'sgd', 'lr': 0.1}, 'max_duration': '6ba',
                        'algorithms': {'imp': {'levels': 2, 'rewind_to': '2ba'}}}, f)
    with open(imp(run, 'rewind_point.pt'), 'r+b') as f:
        f.truncate(100)
    code = cli.main(['instability', run, '--level', '1', '--seeds', '1', '2'])
    err = capsys.readouterr().err
    assert code == 2
    assert 'rewind_point.pt: 100 bytes, the manifest says' in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------- legacy runs
def test_a_run_written_before_manifests_loads_with_one_warning(run):
    folder = imp(run)
    records = verify_run(folder)['records']
    with open(os.path.join(folder, 'levels.jsonl'), 'w') as f:  # the old format: plain JSON lines
        f.writelines(json.dumps(r) + '\n' for r in records)
    for level in range(3):
        os.remove(imp(run, f'level_{level}', MANIFEST_FILE))
    ticket_mod._warned_legacy.clear()
    with pytest.warns(UserWarning) as caught:
        checked = verify_run(folder)
        load_ticket(imp(run, 'level_2'), mlp())
        report = report_of(run)
    assert checked['problems'] == [] and len(checked['records']) == 3
    assert len(caught) == 1 and 'not verified' in str(caught[0].message)
    assert 'Artefacts' not in report and '| 2 |' in report


# ---------------------------------------------------------------------------------------------------- atomic writes
def test_a_crash_while_writing_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = str(tmp_path / 'trained.pt')
    atomic_save({'w': torch.ones(3)}, path)
    before = open(path, 'rb').read()

    def crash(src, dst):
        assert os.path.getsize(src) > 0 and os.path.dirname(src) == os.path.dirname(dst)  # written next to it
        raise OSError('killed')

    monkeypatch.setattr(ticket_mod.os, 'replace', crash)
    with pytest.raises(OSError, match='killed'):
        atomic_save({'w': torch.zeros(1000)}, path)
    with pytest.raises(OSError, match='killed'):
        write_levels(str(tmp_path), [{'level': 0}])
    monkeypatch.undo()
    assert open(path, 'rb').read() == before
    assert sorted(os.listdir(tmp_path)) == ['trained.pt']  # no temp file, no levels.jsonl
    write_levels(str(tmp_path), [{'level': 0, 'x': 1.5}])
    assert verify_run(str(tmp_path))['records'] == [{'level': 0, 'x': 1.5}]
