"""IMP's memory footprint and slim checkpoints (issue 13): while a level trains IMP adds at most 1.25 bytes per
prunable weight on the training device; checkpoints refer to the rewind point and the parent level's trained state
by file and SHA-256 instead of holding them; an unsupported parallelism setting is refused before training.

How device bytes are counted on a CPU-only machine, where host and "device" are the same memory (``HostCopies`` of
benchmarks/memory.py, the benchmark's own accounting): every tensor storage reachable from IMP, the LMC evaluator and
the gradient hooks IMP put on the parameters is counted once, minus the model's own parameters and buffers, minus the
storages IMP's host path created (each copy made by ``stored_copy(..., 'cpu')`` and each module parked by
``move_module_(..., 'cpu')`` is recorded, and kept alive so that no address is reused). On a CUDA machine those
copies are exactly the ones in pinned host memory. The same count with ``offload='device'`` finds the copies beside
the model, so the budget check can fail.
"""
import os
import shutil
import sys

import pytest
import torch
from composer import Callback, Trainer
from composer.optim import CosineAnnealingScheduler

from composer_imp import IMP
from composer_imp.callbacks import LMCEvaluator
from composer_imp.functional.ticket import REWIND_POINT_FILE
from helpers import digits_loader, finish_gloo, free_port, init_gloo, small_cnn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
from memory import HostCopies  # noqa: E402 - the accounting benchmarks/memory.py reports with


class DeviceBytes(Callback):
    """At BATCH_END of pruned levels: the bytes IMP holds on the training device, per prunable weight."""

    imp_rewind = False  # a record across levels

    def __init__(self, host):
        self.host, self.samples = host, []

    def batch_end(self, state, logger):
        imp = state.algorithms[0]
        if imp.level > 0:
            self.samples.append(self.host.device_bytes(state) / sum(m.numel() for m in imp.masks.values()))


def _run(folder, offload, host):
    probe = DeviceBytes(host)
    model = small_cnn()
    trainer = Trainer(model=model, train_dataloader=digits_loader(image=True), eval_dataloader=digits_loader(
        'test', image=True), max_duration='5ba', eval_interval='5ba',
        optimizers=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        schedulers=[CosineAnnealingScheduler()],
        algorithms=[IMP(levels=2, rewind_to='2ba', rewind_optimizer=True, offload=offload,
                        folder=os.path.join(folder, 'imp'))],
        callbacks=[LMCEvaluator(alphas=3), probe], save_folder=os.path.join(folder, 'ckpt'), save_interval='1ba',
        run_name='footprint', progress_bar=False, seed=5, device='cpu')
    trainer.fit()
    imp = trainer.state.algorithms[0]
    result = {'samples': probe.samples, 'masks': imp.masks, 'weights': trainer.state.model.state_dict(),
              'history': imp.history}
    trainer.close()
    return result


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    host = HostCopies().install()
    try:
        folder = tmp_path_factory.mktemp('footprint')
        return {offload: (_run(str(folder / offload), offload, host), str(folder / offload))
                for offload in ('cpu', 'device')}
    finally:
        host.uninstall()


def test_a_level_adds_at_most_1_25_bytes_per_prunable_weight_on_the_device(runs):
    samples = runs['cpu'][0]['samples']
    assert len(samples) == 2 * 3  # every batch of both pruned levels (rewind at 2 of 5)
    assert max(samples) <= 1.25
    assert min(samples) >= 1.0  # the bool masks themselves (1 byte per weight) are counted
    # offload='device' keeps rewind point, parent state, optimizer snapshot and LMC probe beside the model
    assert min(runs['device'][0]['samples']) > 12.0


def test_where_the_copies_live_does_not_change_the_run(runs):
    cpu, device = runs['cpu'][0], runs['device'][0]
    assert all(torch.equal(cpu['masks'][n], device['masks'][n]) for n in cpu['masks'])
    assert all(torch.equal(cpu['weights'][n], device['weights'][n]) for n in cpu['weights'])
    assert [r['lmc/barrier'] for r in cpu['history'][1:]] == [r['lmc/barrier'] for r in device['history'][1:]]


def _imp_state(checkpoint_path):
    algorithms = torch.load(checkpoint_path, weights_only=False)['state']['algorithms']
    return dict(algorithms)['IMP']


def _level_2_checkpoint(folder):
    names = sorted(n for n in os.listdir(os.path.join(folder, 'ckpt')) if n.startswith('level2-'))
    return os.path.join(folder, 'ckpt', names[0])


def test_checkpoints_refer_to_the_rewind_point_and_parent_files_instead_of_holding_them(runs):
    folder = runs['cpu'][1]
    stored = _imp_state(_level_2_checkpoint(folder))
    assert stored['rewind_point'] is None and stored['previous_level_state'] is None
    assert stored['rewind_optimizers'] is None
    assert {k: v['path'] for k, v in stored['files'].items()} == {
        '_rewind_point': REWIND_POINT_FILE, '_previous_level_state': os.path.join('level_1', 'trained.pt'),
        '_rewind_optimizers': 'rewind_optimizers.pt'}
    masks = stored['masks']['module.0.weight']
    assert masks['bits'].dtype == torch.uint8 and masks['bits'].numel() == 72 // 8 and masks['shape'] == [8, 1, 3, 3]


def _resume(folder, checkpoint):
    model = small_cnn()
    return Trainer(model=model, train_dataloader=digits_loader(image=True), max_duration='5ba',
                   optimizers=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                   schedulers=[CosineAnnealingScheduler()],
                   algorithms=[IMP(levels=2, rewind_to='2ba', rewind_optimizer=True, folder=folder)],
                   load_path=checkpoint, progress_bar=False, seed=5, device='cpu')


def test_a_checkpoint_reads_its_files_back_also_into_another_run_folder(runs, tmp_path):
    folder = runs['cpu'][1]
    saved = torch.load(os.path.join(folder, 'imp', REWIND_POINT_FILE), weights_only=True)['state_dict']
    for imp_folder in (os.path.join(folder, 'imp'), str(tmp_path / 'another' / 'imp')):  # load_path into a new run
        trainer = _resume(imp_folder, _level_2_checkpoint(folder))
        imp = trainer.state.algorithms[0]
        point = imp.ticket()['rewind_point']
        assert set(point) == set(saved) and all(torch.equal(point[k], saved[k]) for k in saved)
        assert imp.previous_level_state is not None
        trainer.close()
    copied = torch.load(tmp_path / 'another' / 'imp' / REWIND_POINT_FILE, weights_only=True)['state_dict']
    assert all(torch.equal(copied[k], saved[k]) for k in saved)  # the new folder holds its tickets' rewind point


@pytest.mark.parametrize('damage', ['missing', 'altered'])
def test_a_missing_or_altered_referenced_file_is_refused_in_one_line(runs, tmp_path, damage):
    folder = runs['cpu'][1]
    imp_folder = str(tmp_path / 'imp')
    shutil.copytree(os.path.join(folder, 'imp'), imp_folder)
    checkpoint = torch.load(_level_2_checkpoint(folder), weights_only=False)  # our own file: trusted
    for reference in dict(checkpoint['state']['algorithms'])['IMP']['files'].values():
        reference['folder'] = imp_folder  # the copy is the run's only IMP folder
    torch.save(checkpoint, tmp_path / 'checkpoint.pt')
    path = os.path.join(imp_folder, 'level_1', 'trained.pt')
    if damage == 'missing':
        os.remove(path)
    else:
        with open(path, 'r+b') as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError) as error:
        _resume(imp_folder, str(tmp_path / 'checkpoint.pt'))
    message = str(error.value)
    assert '\n' not in message and path in message
    assert ('which is missing' if damage == 'missing' else 'SHA-256') in message


def test_a_recipe_sets_where_the_copies_live_and_refuses_an_unknown_place(tmp_path):
    from composer_imp.recipes.build import RecipeError, _build_algorithms

    recipe = {'seed': 0, 'algorithms': {'imp': {'levels': 1, 'offload': 'device'}}}
    assert _build_algorithms(recipe, str(tmp_path))[0].offload == 'device'
    recipe['algorithms']['imp']['offload'] = 'gpu'
    with pytest.raises(RecipeError, match=r"offload: 'gpu' is not allowed; use one of \('cpu', 'device'\)"):
        _build_algorithms(recipe, str(tmp_path))


def _read_on_ranks(rank, world, port, folder, references, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    init_gloo(rank, world, port)
    results = []
    for reference in references:
        imp = IMP(levels=1)
        imp._resolved_folder = folder if rank == 0 else folder + '-not-on-this-node'
        imp._unread_files = {'_rewind_point': reference}
        try:
            imp._read_files(None)
            results.append(imp._rewind_point)
        except ValueError as error:
            results.append(str(error))
    torch.save(results, os.path.join(out, f'rank{rank}.pt'))
    finish_gloo()


def test_rank_0_reads_a_referenced_file_for_every_rank_and_a_refusal_reaches_them_all(tmp_path):
    import torch.multiprocessing as mp

    from composer_imp.functional.ticket import file_reference, save_rewind_point

    point = {'w': torch.arange(6.0).view(2, 3), 'n': torch.tensor(3)}
    save_rewind_point(str(tmp_path), point, rewind_batch=2)
    good = file_reference(str(tmp_path), REWIND_POINT_FILE, 'state_dict')
    mp.spawn(_read_on_ranks, args=(2, free_port(), str(tmp_path), [good, {**good, 'sha256': '0' * 64}],
                                   str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        loaded, refused = torch.load(tmp_path / f'rank{rank}.pt')
        assert set(loaded) == set(point) and all(torch.equal(loaded[k], point[k]) for k in point)
        assert refused.startswith("checkpoint: IMP's rewind point file ") and 'SHA-256' in refused


def test_bit_packed_masks_round_trip_exactly():
    from composer_imp.functional.ticket import pack_masks, unpack_masks

    generator = torch.Generator().manual_seed(0)
    masks = {'conv': torch.rand(3, 5, 7, generator=generator) > 0.3, 'one': torch.tensor([True]),
             'empty': torch.zeros(0, 4, dtype=torch.bool)}
    packed = pack_masks(masks)
    assert [entry['bits'].numel() for entry in packed.values()] == [14, 1, 0]  # ceil(numel / 8) bytes
    unpacked = unpack_masks(packed)
    assert all(unpacked[n].dtype == torch.bool and torch.equal(unpacked[n], masks[n]) for n in masks)
