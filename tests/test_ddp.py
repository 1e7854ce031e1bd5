"""Two-rank DDP (Composer's launcher, gloo on CPU): every rank holds the same masks, rewind point and weights."""
import os
import socket
import subprocess
import sys

import torch

HERE = os.path.dirname(__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, returncode: int = 0) -> None:
    """``composer -n 2 script *args`` (gloo on CPU); ``args[0]`` is the output folder, where each rank's stderr goes.
    Asserts the launcher's exit status (``returncode``: a run that ends every rank with ``os._exit(3)`` exits 3)."""
    launcher = os.path.join(os.path.dirname(sys.executable), 'composer')
    result = subprocess.run([launcher, '-n', '2', '--master_port', str(free_port()), '--stdout', os.devnull,
                             '--stderr', os.path.join(args[0], 'stderr_{rank}.txt'), os.path.join(HERE, script),
                             *args], capture_output=True, text=True, timeout=600)
    logs = ''.join(open(os.path.join(args[0], f'stderr_{r}.txt')).read()[-3000:] for r in range(2)
                   if os.path.exists(os.path.join(args[0], f'stderr_{r}.txt')))
    assert result.returncode == returncode, result.stdout[-2000:] + result.stderr[-2000:] + logs


def test_two_rank_ddp_gives_identical_masks_rewind_points_and_weights(tmp_path):
    launch('ddp_imp_script.py', str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    assert rank0['ticket']['level'] == rank1['ticket']['level'] == 2
    assert 0.6 < rank0['ticket']['density'] < 0.7
    for key in ('masks', 'params'):
        assert rank0[key].keys() == rank1[key].keys()
        assert all(torch.equal(rank0[key][k], rank1[key][k]) for k in rank0[key])
    point0, point1 = rank0['ticket']['rewind_point'], rank1['ticket']['rewind_point']
    assert any('running_var' in k for k in point0)
    assert all(torch.equal(point0[k], point1[k]) for k in point0)
    assert [r['steps'] for r in rank0['history']] == [r['steps'] for r in rank1['history']] == [6, 4, 4]
    assert os.path.isfile(tmp_path / 'imp' / 'level_2' / 'mask.pt')
