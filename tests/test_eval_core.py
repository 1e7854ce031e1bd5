"""The one evaluation core (composer_imp.evaluation) on Hugging Face models: BERT sequence classification and a GPT-2
causal LM, both tiny and randomly initialised (no download), on dict / ``BatchEncoding`` batches of a tiny
deterministic token grammar. The LMC evaluator, the adaptive step and instability analysis run end to end inside real
``Trainer.fit()`` runs; the core's batch handling, value naming and level records are pinned on their own."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Evaluator
from composer.loggers import InMemoryLogger
from composer.metrics.nlp import BinaryF1Score, LanguageCrossEntropy, LanguagePerplexity, MaskedAccuracy
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import BatchEncoding, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from composer_imp import IMP, AdaptiveSparsityStep, load_ticket
from composer_imp.algorithms.imp import SparsityStep
from composer_imp.callbacks import LMCEvaluator
from composer_imp.evaluation import (
    DeviceBatches,
    Scorer,
    resolve_value,
    resolve_values,
    train_batches,
    unwrap_model,
)
from composer_imp.functional import snapshot
from composer_imp.instability import instability_analysis
from helpers import digits_tensors, mlp

VOCAB, LENGTH, T = 16, 12, '4ba'


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One torch thread: two threads on two shared cores make these small runs slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- data and models
def grammar(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of the rule x[t+1] = (x[t] + step) % VOCAB, step 1 (class 0) or 3 (class 1), random start."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=generator)
    classes = torch.randint(0, 2, (n,), generator=generator)
    steps = (1 + 2 * classes)[:, None]
    return (starts + steps * torch.arange(LENGTH)) % VOCAB, classes


def collate(lm: bool):
    """Batches as a tokenizer would give them: a ``BatchEncoding`` (a UserDict, not a dict)."""

    def to_batch(samples):
        ids = torch.stack([ids for ids, _ in samples])
        labels = ids.clone() if lm else torch.stack([label for _, label in samples])
        return BatchEncoding({'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': labels})

    return to_batch


def loader(kind: str, n: int, seed: int, batch_size: int = 8, shuffle: bool = False, generator=None) -> DataLoader:
    ids, classes = grammar(n, seed)
    return DataLoader(TensorDataset(ids, classes), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate(kind == 'gpt2'), drop_last=shuffle)


def hf_model(kind: str) -> HuggingFaceModel:
    torch.manual_seed(0)
    if kind == 'bert':
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, num_labels=2, max_position_embeddings=LENGTH)
        return HuggingFaceModel(BertForSequenceClassification(config), use_logits=True,
                                metrics=[MulticlassAccuracy(num_classes=2, average='micro')])
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH)
    return HuggingFaceModel(GPT2LMHeadModel(config), use_logits=True,
                            metrics=[LanguageCrossEntropy(), MaskedAccuracy()])


def trainer(kind: str, model, seed: int = 7, algorithms=(), callbacks=(), loggers=(), train=None, duration=T):
    return Trainer(model=model, train_dataloader=train or loader(kind, 64, seed=1, shuffle=True),
                   eval_dataloader=loader(kind, 32, seed=2, batch_size=16), max_duration=duration,
                   optimizers=torch.optim.Adam(model.parameters(), lr=3e-3), algorithms=list(algorithms),
                   callbacks=list(callbacks), loggers=list(loggers), seed=seed, progress_bar=False,
                   log_to_console=False, device='cpu')


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope='module', params=['bert', 'gpt2'])
def lmc_run(request, tmp_path_factory):
    """IMP(levels=2, rewind_to='2ba') with the LMC evaluator on a Hugging Face model, logged in memory."""
    kind, folder = request.param, tmp_path_factory.mktemp(f'lmc_{request.param}')
    logger, imp = InMemoryLogger(), IMP(levels=2, rewind_to='2ba', folder=str(folder))
    run = trainer(kind, hf_model(kind), algorithms=[imp], callbacks=[LMCEvaluator(alphas=3)], loggers=[logger])
    run.fit()
    run.close()
    return {'kind': kind, 'imp': imp, 'logged': logger.data, 'folder': folder}


def test_lmc_evaluator_logs_finite_barriers_on_hf_models(lmc_run):
    headline = {'bert': 'error', 'gpt2': 'loss'}[lmc_run['kind']]  # a language model's default is the loss
    pruned = lmc_run['imp'].history[1:]
    assert len(pruned) == 2
    for record in pruned:
        assert record['lmc/metric'] == headline
        # The loss barrier and the (token) error barrier are both in the record, the headline's as lmc/barrier.
        assert finite(record['lmc/barrier/loss']) and finite(record['lmc/barrier/error'])
        assert record['lmc/barrier'] == record[f'lmc/barrier/{headline}']
        assert 0.0 <= record['lmc/error'] <= 1.0 and finite(record['lmc/loss'])
        assert record['lmc/curve']['alphas'] == [0.0, 0.5, 1.0] and len(record['lmc/curve']['loss']) == 3
        assert isinstance(record['imp/matching'], bool) and isinstance(record['lmc/connected'], bool)
    assert [v for _, v in lmc_run['logged']['lmc/barrier/error']] == [r['lmc/barrier/error'] for r in pruned]
    assert [v for _, v in lmc_run['logged']['lmc/barrier/loss']] == [r['lmc/barrier/loss'] for r in pruned]


def test_instability_analysis_runs_on_hf_models(lmc_run):
    kind, level_dir = lmc_run['kind'], os.path.join(lmc_run['folder'], 'level_2')
    ticket = load_ticket(level_dir)
    result = instability_analysis(lambda model, seed: trainer(kind, model, seed=seed), ticket, seeds=(1, 2),
                                  model=hf_model(kind), alphas=3, level_dir=level_dir)
    assert result['metric'] == {'bert': 'error', 'gpt2': 'loss'}[kind]
    assert set(result['barriers']) == {'error', 'loss'} and finite(result['barrier_max_minus_mean'])
    assert result['barrier_max_minus_mean'] == result['barriers'][result['metric']]['max_minus_mean']
    assert all(len(curve) == 3 for curve in result['values'].values())
    with open(os.path.join(level_dir, 'instability_seeds_1_2.json')) as f:
        assert json.load(f)['barrier_linear'] == result['barrier_linear']


@pytest.mark.parametrize('kind', ['bert', 'gpt2'])
def test_adaptive_step_runs_on_hf_models(kind, tmp_path):
    step = AdaptiveSparsityStep(val_dataloader=loader(kind, 32, seed=3, batch_size=16), probe_samples=32,
                                backoff_on='either', alphas=3, max_levels=2)
    imp = IMP(target_density=0.05, rewind_to='2ba', sparsity_step=step, folder=str(tmp_path))
    run = trainer(kind, hf_model(kind), algorithms=[imp])
    run.fit()
    run.close()
    first = imp.history[1]
    projection = first['step']['projection']
    assert projection['metric'] == 'loss' and projection['samples'] == 32
    assert all(finite(t['loss']) and finite(t['error']) and finite(t['delta']) for t in projection['tried'])
    for record in imp.history[1:]:
        verify = record['verify']
        assert verify['on'] == 'val' and verify['metric'] == 'error' and verify['samples'] == 32
        assert finite(verify['value']) and finite(verify['barrier']) and finite(verify['dense_value'])
        assert isinstance(record['adaptive/verified'], bool)


class ScriptedStep(SparsityStep):
    """Replays another run's decisions (fractions and verdicts) without evaluating anything."""

    needs_previous_level = True

    def __init__(self, history):
        super().__init__()
        self.fractions = [r['step']['fraction'] for r in history[1:]]
        self.verdicts = [r['accepted'] for r in history[1:]]

    def fraction(self, state, imp, logger):
        self.decision = {'fraction': self.fractions.pop(0)}
        return self.decision['fraction']

    def accept(self, state, imp, record, logger):
        return self.verdicts.pop(0)

    def finished(self, imp):
        return not self.fractions


def test_lmc_evaluator_and_adaptive_step_leave_the_training_run_bit_identical(tmp_path):
    """Their evaluations iterate the train loader (probe, BatchNorm-free train subset) and the eval and validation
    loaders; a run replaying the same decisions without them must end with the same weights, also when the train
    loader shuffles with its own generator."""

    def run(folder, step, callbacks):
        train = loader('bert', 64, seed=1, shuffle=True, generator=torch.Generator().manual_seed(5))
        imp = IMP(target_density=0.05, rewind_to='2ba', sparsity_step=step, folder=str(folder))
        fit = trainer('bert', hf_model('bert'), algorithms=[imp], callbacks=callbacks, train=train)
        fit.fit()
        fit.close()
        return imp, snapshot(unwrap_model(fit.state))

    adaptive = AdaptiveSparsityStep(val_dataloader=loader('bert', 32, seed=3, batch_size=16), probe_samples=32,
                                    backoff_on='either', alphas=3, max_levels=2)
    lmc = LMCEvaluator(alphas=3, train_subset_batches=2)
    measured, weights = run(tmp_path / 'measured', adaptive, [lmc])
    assert 'lmc/train/barrier' in measured.history[-1] and len(measured.history) >= 3
    replayed, replayed_weights = run(tmp_path / 'replayed', ScriptedStep(measured.history), [])
    assert [r['accepted'] for r in replayed.history] == [r['accepted'] for r in measured.history]
    assert all(torch.equal(measured.masks[n], replayed.masks[n]) for n in measured.masks)
    assert all(torch.equal(weights[n], replayed_weights[n]) for n in weights)


# ---------------------------------------------------------------------------------------------- level records
def test_level_records_hold_every_evaluator_at_the_level_end_never_an_earlier_steps_value(tmp_path):
    """Evaluator 'often' runs every batch, 'rarely' every 3 batches: at the end of level 0 (batch 4) the Trainer has
    'rarely' only from batch 3; the record must hold its value for the trained network of batch 4."""
    x, y = digits_tensors()
    often = DataLoader(TensorDataset(x[1400:1600], y[1400:1600]), batch_size=100)
    rarely = DataLoader(TensorDataset(x[1600:], y[1600:]), batch_size=100)
    logger, imp = InMemoryLogger(), IMP(levels=1, rewind_to='1ba', folder=str(tmp_path))
    model = mlp()
    run = Trainer(model=model, train_dataloader=DataLoader(TensorDataset(x[:640], y[:640]), batch_size=64),
                  eval_dataloader=[Evaluator(label='often', dataloader=often, eval_interval='1ba'),
                                   Evaluator(label='rarely', dataloader=rarely, eval_interval='3ba')],
                  max_duration='4ba', optimizers=torch.optim.SGD(model.parameters(), lr=0.5), algorithms=[imp],
                  loggers=[logger], progress_bar=False, log_to_console=False, device='cpu', seed=3)
    run.fit()
    run.close()
    stale = [float(value) for time, value in logger.data['metrics/rarely/CrossEntropy'] if int(time.batch) == 3][0]
    for record in imp.history:
        trained = mlp()
        trained.load_state_dict(torch.load(tmp_path / f'level_{record["level"]}' / 'trained.pt'))
        with torch.no_grad():
            for label, data in (('often', often), ('rarely', rarely)):
                inputs, targets = data.dataset.tensors
                expected = F.cross_entropy(trained.module(inputs), targets).item()
                # float32 sums over two batches against one: 1e-5 apart; a step of training moves it 2e-3
                assert record['eval'][f'{label}/CrossEntropy'] == pytest.approx(expected, rel=1e-4), label
    assert imp.history[0]['eval']['rarely/CrossEntropy'] != pytest.approx(stale, rel=1e-4)


# ---------------------------------------------------------------------------------------------- batches
def test_mapping_batches_are_scored_alike_as_dicts_batch_encodings_and_microbatches_and_left_intact():
    model = hf_model('gpt2')
    state = trainer('gpt2', model).state
    batches = list(loader('gpt2', 32, seed=2, batch_size=16))
    originals = [{k: v.clone() for k, v in b.items()} for b in batches]
    values = resolve_values(model.get_metrics(is_train=False))
    scores = [Scorer(state, DeviceBatches(state, data, microbatch_size=size), model.get_metrics(), values)(model)
              for data, size in ((batches, None), ([dict(b) for b in batches], None), (batches, 5))]
    assert [v.name for v in values] == ['loss', 'error']
    assert scores[0] == scores[1]
    assert scores[2]['error'] == pytest.approx(scores[0]['error'], abs=1e-6)  # token counts: exact up to rounding
    assert scores[2]['loss'] == pytest.approx(scores[0]['loss'], rel=1e-2)  # sample-weighted means of 5, 5, 5, 1
    # eval_forward pops and shifts the labels of the batch it is given: never of the caller's batches
    assert all(torch.equal(b[k], o[k]) for b, o in zip(batches, originals) for k in o)


@pytest.mark.parametrize('rank, kept', [(0, [0, 2, 4]), (1, [1, 3])])
def test_the_sample_a_distributed_sampler_pads_onto_the_last_batch_is_dropped(rank, kept):
    """Five samples over two ranks: rank 1's shard is [1, 3, 0], where 0 repeats rank 0's first sample."""
    state = Trainer(model=mlp(), device='cpu', progress_bar=False, log_to_console=False).state
    data = TensorDataset(torch.arange(5.0)[:, None], torch.arange(5))
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    for batch_size, microbatch in ((2, None), (3, 2), (3, None)):
        batches = DeviceBatches(state, DataLoader(data, batch_size=batch_size, sampler=sampler), None, microbatch)
        assert [int(i) for _, targets in batches for i in targets] == kept, (batch_size, microbatch)
    partial = DeviceBatches(state, DataLoader(data, batch_size=1, sampler=sampler), limit=2)
    assert [int(t) for _, t in partial] == [rank, rank + 2]  # not a full pass: nothing dropped


def test_iterating_a_loader_leaves_its_own_generator_where_it_was():
    state = Trainer(model=mlp(), device='cpu', progress_bar=False, log_to_console=False).state
    generator = torch.Generator().manual_seed(11)
    data = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=4, shuffle=True, generator=generator)
    before = generator.get_state()
    first = [b for b in train_batches(state, data)]
    assert torch.equal(generator.get_state(), before)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, train_batches(state, data)))


# ---------------------------------------------------------------------------------------------- value names
def test_values_are_named_by_the_user_and_always_lower_is_better():
    classifier = {'MulticlassAccuracy': MulticlassAccuracy(num_classes=3), 'CrossEntropy': LanguageCrossEntropy()}
    language = {'LanguageCrossEntropy': LanguageCrossEntropy(), 'MaskedAccuracy': MaskedAccuracy(),
                'LanguagePerplexity': LanguagePerplexity()}
    assert [v.name for v in resolve_values(classifier)] == ['error', 'loss']
    assert [v.name for v in resolve_values(language)] == ['loss', 'error']
    assert [v.name for v in resolve_values(language, 'perplexity')] == ['perplexity', 'loss', 'error']
    assert resolve_value('MulticlassAccuracy', classifier) == resolve_value('error', classifier)
    assert resolve_value('error', language).read({'MaskedAccuracy': 0.75}, None) == 0.25
    assert resolve_value('LanguagePerplexity', language).read({'LanguagePerplexity': 3.0}, None) == 3.0
    f1 = resolve_value('MulticlassF1Score', {'MulticlassF1Score': MulticlassF1Score(num_classes=3)})
    assert f1.name == '1-MulticlassF1Score' and f1.read({'MulticlassF1Score': 0.9}, None) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="metric: cannot tell whether a higher BinaryF1Score is better"):
        resolve_value('BinaryF1Score', {'BinaryF1Score': BinaryF1Score()})
    with pytest.raises(ValueError, match="metric: 'BLEU' is not allowed"):
        resolve_value('BLEU', classifier)
    with pytest.raises(ValueError, match="metric: 'perplexity' needs an eval metric"):
        resolve_value('perplexity', classifier)
    with pytest.raises(ValueError, match='metric'):
        LMCEvaluator(metric=3)
