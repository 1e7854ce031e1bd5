"""llm-foundry 0.22 as a client: its own ``train_from_yaml`` runs IMP and the LMC evaluator from
``recipes/llmfoundry_mpt_tiny.yaml`` on a tiny MPT, on 1 and 2 CPU ranks, with a tokenizer and MDS text shards made
here (nothing is downloaded)."""
import json
import math
import os
import random

import pytest
import torch
from omegaconf import OmegaConf

from composer_imp.functional import layer_densities, masks_at_density, prunable_weights
from test_ddp import launch

RECIPE = os.path.join(os.path.dirname(__file__), '..', 'recipes', 'llmfoundry_mpt_tiny.yaml')
T, K, LEVELS = 12, 4, 2  # the recipe's max_duration, rewind_to and levels
SEQUENCE = 32  # its max_seq_len
WORDS = (['the cat', 'a dog', 'the bird', 'my friend', 'the teacher', 'a child'],
         ['sees', 'likes', 'finds', 'follows', 'helps', 'draws'],
         ['the ball', 'a tree', 'the river', 'a small house', 'the red car', 'some bread'])


def write_text_run_inputs(folder) -> list[str]:
    """A byte-level BPE tokenizer trained on toy sentences and 96/32 MDS text samples of them (llm-foundry's `text`
    format); returns the recipe overrides that point at them and at a run folder."""
    from streaming import MDSWriter
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [' '.join(f'{rng.choice(WORDS[0])} {rng.choice(WORDS[1])} {rng.choice(WORDS[2])}.' for _ in range(3))
             for _ in range(128)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>', '<|pad|>'],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>', pad_token='<|pad|>')
    tokenizer.save_pretrained(os.path.join(folder, 'tokenizer'))
    for split, samples in (('train', texts[:96]), ('val', texts[96:])):
        with MDSWriter(columns={'text': 'str'}, out=os.path.join(folder, 'data', split)) as writer:
            for text in samples:
                writer.write({'text': text})
    return [f'variables.data_local={folder}/data', f'variables.tokenizer={folder}/tokenizer',
            f'variables.run_folder={folder}/run']


def check_level_records(history: list[dict], flops_method: str = 'torch-pruning') -> None:
    """Steps T + L(T - k), barriers of loss and token error per pruned level, FLOPs per level falling with density."""
    assert [r['level'] for r in history] == list(range(LEVELS + 1)) and all(r['accepted'] for r in history)
    steps = [r['steps'] for r in history]
    assert steps == [T] + [T - K] * LEVELS and sum(steps) == T + LEVELS * (T - K)
    assert history[-1]['density'] == pytest.approx(0.7**LEVELS, abs=1e-4)
    for record in history[1:]:
        for key in ('lmc/barrier/loss', 'lmc/barrier/error', 'lmc/barrier_max_minus_mean/loss'):
            assert math.isfinite(record[key]) and record[key] >= 0, key
        assert record['lmc/metric'] == 'loss' and isinstance(record['lmc/connected'], bool)
        assert isinstance(record['imp/matching'], bool)
        assert 0 < record['lmc/error'] < 1 and len(record['lmc/curve']['error']) == 5
    flops_per_sample = [r['flops'] / r['samples'] for r in history]
    assert all(f > 0 for f in flops_per_sample) and flops_per_sample == sorted(flops_per_sample, reverse=True)
    assert {r['flops_method'] for r in history} == {flops_method}


def test_train_from_yaml_runs_imp_and_the_lmc_evaluator_on_a_tiny_mpt(streaming_env):
    from llmfoundry.command_utils import train_from_yaml

    from composer_imp.evaluation import unwrap_model

    trainer = train_from_yaml(RECIPE, write_text_run_inputs(streaming_env))
    imp = next(a for a in trainer.state.algorithms if type(a).__name__ == 'IMP')
    check_level_records(imp.history)
    params = dict(unwrap_model(trainer.state).named_parameters())
    assert len(imp.masks) == 4 * 2  # Wqkv, out_proj, up_proj, down_proj of each block
    for name, mask in imp.masks.items():
        assert not mask.all() and torch.count_nonzero(params[name].detach()[~mask]) == 0, name
    macs = imp.dense_macs
    assert macs['method'] == 'torch-pruning' and macs['sequence_length'] == SEQUENCE
    assert macs['dense_per_token'] == pytest.approx(macs['dense'] / SEQUENCE) and set(macs['weights']) == set(imp.masks)
    with open(os.path.join(streaming_env, 'run', 'imp', 'levels.jsonl')) as f:
        written = [json.loads(line) for line in f]
    assert [r['lmc/barrier/error'] for r in written[1:]] == [r['lmc/barrier/error'] for r in imp.history[1:]]
    assert [r['final'] for r in written] == [False] * LEVELS + [True]
    trainer.close()
    from composer_imp.report import build_report

    with open(build_report(str(streaming_env / 'run'))) as f:  # llm-foundry's run has no run.json of the CLI
        assert f'**Status:** complete: {LEVELS + 1} levels.' in f.read()


def test_two_ranks_hold_identical_masks_weights_and_verdicts(streaming_env):
    launch('llmfoundry_ddp_worker.py', str(streaming_env), RECIPE, *write_text_run_inputs(streaming_env))
    rank0, rank1 = (torch.load(streaming_env / f'rank{r}.pt', weights_only=False) for r in range(2))
    check_level_records(rank0['history'])
    for key in ('masks', 'params'):
        assert rank0[key].keys() == rank1[key].keys()
        assert all(torch.equal(rank0[key][k], rank1[key][k]) for k in rank0[key]), key
    verdicts = ('level', 'density', 'steps', 'lmc/barrier/loss', 'lmc/barrier/error', 'lmc/connected', 'imp/matching')
    assert [[r.get(k) for k in verdicts] for r in rank0['history']] == [[r.get(k) for k in verdicts]
                                                                         for r in rank1['history']]
    assert all(torch.count_nonzero(rank0['params'][n][~m]) == 0 for n, m in rank0['masks'].items())


def test_llmfoundrys_fsdp2_shards_imps_masks_and_prunes_exactly_the_single_process_masks(streaming_env, monkeypatch):
    """llm-foundry's own fsdp_config, as FSDP2 (FSDP_VERSION=2), 2 ranks: each rank holds its rows of every mask, the
    level files hold the whole masks, which are the single-process masks of the trained weights. The recipe's LAMP
    scope sorts whole tensors and is refused under FSDP2, so this run prunes globally."""
    monkeypatch.setenv('FSDP_VERSION', '2')
    launch('llmfoundry_ddp_worker.py', str(streaming_env), RECIPE, *write_text_run_inputs(streaming_env),
           'fsdp_config={}', 'algorithms.imp.scope=global')
    ranks = [torch.load(streaming_env / f'rank{r}.pt', weights_only=False) for r in range(2)]
    check_level_records(ranks[0]['history'], flops_method='torch-flop-counter')  # torch-pruning cannot copy FSDP2
    assert sorted(os.listdir(streaming_env / 'run' / 'imp' / 'shards')) == ['rank0-of-2', 'rank1-of-2']
    levels = [torch.load(streaming_env / 'run' / 'imp' / f'level_{level}' / name)
              for level in range(LEVELS + 1) for name in ('mask.pt', 'trained.pt')]
    masks, trained = [m['masks'] for m in levels[0::2]], levels[1::2]
    for rank, held in enumerate(ranks):
        assert all(torch.equal(mask, torch.chunk(masks[-1][name], 2)[rank]) for name, mask in held['masks'].items())
    for level in range(LEVELS):
        expected = masks_at_density({n: trained[level][n] for n in masks[level]}, 0.7 ** (level + 1), masks[level])
        assert all(torch.equal(masks[level + 1][n], expected[n]) for n in expected)
        assert all(torch.count_nonzero(trained[level + 1][n][~m]) == 0 for n, m in masks[level + 1].items())


def test_lamp_keeps_mpts_down_scaled_output_projections_where_global_magnitude_empties_them():
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

    model_cfg = OmegaConf.to_container(OmegaConf.load(RECIPE), resolve=True)['model']
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(**{k: v for k, v in model_cfg.items()
                                        if k not in ('name', 'init_device', 'loss_fn')}))
    weights = prunable_weights(model)
    by_scope = {scope: layer_densities(masks_at_density(weights, 0.3, scope=scope)) for scope in ('global', 'lamp')}
    down_proj = [n for n in weights if n.endswith('down_proj.weight')]
    assert max(by_scope['global'][n] for n in down_proj) < 0.05  # initialized at 1/sqrt(2 n_layers) scale
    assert min(by_scope['lamp'].values()) > 0.15
