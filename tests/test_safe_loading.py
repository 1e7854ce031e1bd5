"""Loading runs nothing: a payload planted in a CIFAR batch or a Composer checkpoint is refused in one line, unrun, on
every load path (CIFAR folder reader, convert --src, autoresume, load_path); legitimate files keep loading."""
import os
import pickle

import numpy as np
import pytest
import torch

from composer_imp import cli
from composer_imp.data import build_dataset
from composer_imp.recipes import REGISTRIES, build_trainer, load_recipe
from composer_imp.safe_load import CHECKPOINT_GLOBALS, check_checkpoint, load_cifar_batch
from test_cli import StopAfterFirstLevel, levels, run_cli, write_recipe
from test_data import write_cifar


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def plant_in_cifar(root, marker, file='test_batch'):
    path = root / 'cifar-10-batches-py' / file
    with open(path, 'wb') as f:
        pickle.dump({'data': Payload(marker), 'labels': [0]}, f)
    return path


STOP = 'callbacks.stop_after_first_level={}'  # part of the recipe: a resume must repeat it (the resume check)


@pytest.fixture
def interrupted_run(tmp_path):
    """The tiny recipe with autoresume, stopped (Ctrl-C) right after level 0: (recipe path, run folder, latest
    checkpoint). The stopping callback stays registered for the test's resumes; it fires only once."""
    recipe = write_recipe(tmp_path / 'tiny.yaml', run_name='resumable', autoresume=True, loggers={}, callbacks={})
    run = str(tmp_path / 'run')
    REGISTRIES['callbacks'].register('stop_after_first_level', StopAfterFirstLevel)
    StopAfterFirstLevel.armed = True
    try:
        code = cli.main(['run', recipe, f'save_folder={run}', STOP])
        assert code == 130 and [r['level'] for r in levels(run)] == [0]
        latest = os.path.join(run, 'checkpoints', 'latest-rank0.pt')
        assert os.path.islink(latest)
        yield recipe, run, latest
    finally:
        REGISTRIES['callbacks'].unregister('stop_after_first_level')


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_the_payloads_are_live_without_the_guards(tmp_path):
    """Control: the planted files do run code through plain pickle / Composer's weights_only=False load."""
    write_cifar(tmp_path, 'cifar10')
    path = plant_in_cifar(tmp_path, tmp_path / 'ran_pickle')
    with open(path, 'rb') as f:
        pickle.load(f)
    torch.save({'state': Payload(tmp_path / 'ran_torch')}, tmp_path / 'bad.pt')
    torch.load(tmp_path / 'bad.pt', weights_only=False)
    assert (tmp_path / 'ran_pickle').exists() and (tmp_path / 'ran_torch').exists()


# ---------------------------------------------------------------------------------------------------- CIFAR
def test_cifar_folder_reader_refuses_a_planted_payload_unrun(tmp_path):
    write_cifar(tmp_path, 'cifar10')
    marker = tmp_path / 'MARKER'
    path = plant_in_cifar(tmp_path, marker)
    with pytest.raises(ValueError) as error:
        build_dataset('cifar10', 'test', root=tmp_path)
    message = str(error.value)
    assert message == (f'{path} is not a CIFAR python batch: it holds os.system, which such a batch never does; it '
                       'was not loaded')
    assert not marker.exists()
    assert len(build_dataset('cifar10', 'train', root=tmp_path)) == 20  # the untouched batches still load


def test_cifar_batches_as_python_2_and_3_write_them_load(tmp_path):
    """Protocol 2 (bytes through _codecs.encode, arrays through _reconstruct) and 5 (_frombuffer), numpy scalars."""
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    entry = {'batch_label': 'testing batch 1 of 1', 'labels': [3, np.int64(7)], 'data': data,
             'filenames': [b'a.png', b'b.png'], 'mean': np.float32(0.5)}
    for protocol in (2, 5):
        path = tmp_path / f'batch_p{protocol}'
        path.write_bytes(pickle.dumps(entry, protocol=protocol))
        loaded = load_cifar_batch(path)
        assert np.array_equal(loaded['data'], data) and loaded['labels'] == [3, 7]
        assert loaded['filenames'] == [b'a.png', b'b.png'] and loaded['mean'] == np.float32(0.5)


def test_convert_src_refuses_a_planted_payload_unrun(streaming_env, capsys):
    write_cifar(streaming_env, 'cifar10')
    marker = streaming_env / 'MARKER'
    path = plant_in_cifar(streaming_env, marker, file='data_batch_3')
    out = streaming_env / 'mds'
    code, _, err = run_cli(['convert', 'cifar10', '--src', str(streaming_env), '--out', str(out)], capsys)
    assert code == 2
    assert f'{path} is not a CIFAR python batch: it holds os.system' in one_line(err)
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_globals_are_exactly_what_a_real_checkpoint_needs(interrupted_run):
    """Each listed global is needed: a real composer_imp checkpoint fails to load without any one of them."""
    _, _, latest = interrupted_run
    check_checkpoint(latest)
    for left_out in CHECKPOINT_GLOBALS:
        with torch.serialization.safe_globals([g for g in CHECKPOINT_GLOBALS if g is not left_out]):
            with pytest.raises(pickle.UnpicklingError):
                torch.load(latest, map_location='cpu', weights_only=True)


def test_autoresume_refuses_a_payload_added_to_the_latest_checkpoint_unrun(interrupted_run, tmp_path, capsys):
    recipe, run, latest = interrupted_run
    checkpoint = torch.load(latest, map_location='cpu', weights_only=False)  # our own file: trusted
    marker = tmp_path / 'MARKER'
    checkpoint['state']['callbacks']['Payload'] = Payload(marker)
    torch.save(checkpoint, latest)  # through the symlink, as an attacker with write access to the folder would
    code, _, err = run_cli(['run', recipe, f'save_folder={run}', STOP], capsys)  # the same command again
    assert code == 2
    assert one_line(err) == (f'composer-imp: error: autoresume: the latest checkpoint {latest} is not a safe '
                             'composer_imp checkpoint: it holds os.system, which torch.load(weights_only=True) does '
                             'not allow; it was not loaded')
    assert not marker.exists()
    assert [r['level'] for r in levels(run)] == [0]  # nothing trained


def test_load_path_refuses_a_payload_checkpoint_unrun(tmp_path, capsys):
    marker = tmp_path / 'MARKER'
    bad = tmp_path / 'bad.pt'
    torch.save({'state': Payload(marker)}, bad)
    recipe = write_recipe(tmp_path / 'tiny.yaml', loggers={}, load_path=str(bad))
    code, _, err = run_cli(['run', recipe, f'save_folder={tmp_path}/run'], capsys)
    assert code == 2
    assert one_line(err) == (f'composer-imp: error: load_path: the checkpoint {bad} is not a safe composer_imp '
                             'checkpoint: it holds os.system, which torch.load(weights_only=True) does not allow; it '
                             'was not loaded')
    assert not marker.exists() and not (tmp_path / 'run').exists()
    with pytest.raises(ValueError, match='load_path: the checkpoint .* holds os.system'):  # build_trainer, too
        build_trainer(load_recipe(recipe, [f'save_folder={tmp_path}/run2']))
    assert not marker.exists()


def test_a_legitimate_resume_and_load_path_pass_the_check(interrupted_run, tmp_path, capsys):
    recipe, run, latest = interrupted_run
    trainer = build_trainer(load_recipe(recipe, [f'save_folder={tmp_path}/other', 'run_name=other',
                                                 'autoresume=false', f'load_path={latest}', STOP]))
    assert int(trainer.state.timestamp.batch) > 0  # Composer loaded the checked checkpoint
    trainer.close()
    code, _, err = run_cli(['run', recipe, f'save_folder={run}', STOP], capsys)  # the same command again
    assert code == 0, err
    assert [r['level'] for r in levels(run)] == [0, 1, 2]
