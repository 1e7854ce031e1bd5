"""Which weights are prunable, decided by tensor identity: tied weights, transformers' Conv1D, MultiheadAttention,
parametrized weights, embeddings, and how much of a model the prunable set covers."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from composer_imp.functional import (
    apply_masks,
    coverage_warning,
    load_ticket,
    magnitude_masks,
    prunable_coverage,
    prunable_weights,
    rewind,
    snapshot,
)
from composer_imp.functional.ticket import save_level, save_rewind_point

GPT2_CONV1D = {f'transformer.h.{i}.{layer}.weight' for i in range(2)
               for layer in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')}


def gpt2(tied=True):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      tie_word_embeddings=tied))


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def test_tied_gpt2_prunes_every_conv1d_and_keeps_the_tied_embedding_table_dense():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    weights = prunable_weights(model)
    assert set(weights) == GPT2_CONV1D
    assert list(weights) == [n for n, _ in model.named_parameters() if n in weights]
    assert all(weights[n] is p for n, p in model.named_parameters() if n in weights)


def test_tied_gpt2_with_embeddings_has_one_entry_for_the_tied_tensor_under_its_named_parameters_name():
    model = gpt2()
    weights = prunable_weights(model, embeddings=True)
    assert set(weights) == GPT2_CONV1D | {'transformer.wte.weight', 'transformer.wpe.weight'}
    assert weights['transformer.wte.weight'] is model.lm_head.weight
    # the other path of the tied tensor may name it in `ignore`
    assert 'transformer.wte.weight' not in prunable_weights(model, ignore=['lm_head.weight'], embeddings=True)


def test_untied_gpt2_prunes_its_lm_head_and_not_the_embedding():
    model = gpt2(tied=False)
    assert set(prunable_weights(model)) == GPT2_CONV1D | {'lm_head.weight'}


def test_ignore_patterns_are_checked_against_the_prunable_set_and_list_it():
    with pytest.raises(ValueError, match=r"ignore: pattern 'lm_head.weight' matches no prunable weight; prunable "
                                         r"weights are \['transformer.h.0.attn.c_attn.weight'"):
        prunable_weights(gpt2(), ignore=['lm_head.weight'])
    with pytest.raises(ValueError, match='model: no prunable weights .* pass embeddings=True'):
        prunable_weights(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)))


def test_pruning_a_tied_weight_zeroes_the_one_tensor_the_model_uses_and_rewinds_bit_exactly():
    model = gpt2()
    point = snapshot(model)
    assert {'transformer.wte.weight', 'lm_head.weight'} <= set(point)
    masks = magnitude_masks(prunable_weights(model, embeddings=True), 0.5)
    apply_masks(model, masks)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (model.lm_head.weight[~masks['transformer.wte.weight']] == 0).all()
    assert int((model.lm_head.weight == 0).sum()) == int((~masks['transformer.wte.weight']).sum())

    perturb(model)
    rewind(model, point, masks)
    assert model.lm_head.weight is model.transformer.wte.weight
    params = dict(model.named_parameters())
    for name, value in point.items():
        canonical = 'transformer.wte.weight' if name == 'lm_head.weight' else name
        expected = value.masked_fill(~masks[canonical], 0) if canonical in masks else value
        assert torch.equal(model.state_dict()[name], expected), name
        if canonical in params:
            assert torch.equal(params[canonical], expected)
    model(torch.arange(8).view(1, 8))


def test_rewind_refuses_a_point_whose_tied_entries_differ():
    model = gpt2()
    point = snapshot(model)
    point['lm_head.weight'] = point['lm_head.weight'] + 1
    with pytest.raises(ValueError, match=r"rewind point\['lm_head.weight'\]: differs from 'transformer.wte.weight'"):
        rewind(model, point)


def test_a_saved_ticket_of_tied_gpt2_loads_into_a_fresh_model(tmp_path):
    model = gpt2()
    point = snapshot(model)
    masks = magnitude_masks(prunable_weights(model, embeddings=True), 0.3)
    save_rewind_point(str(tmp_path), point, 0)
    save_level(str(tmp_path), 1, masks, model.state_dict())
    fresh = gpt2()
    perturb(fresh)
    load_ticket(str(tmp_path / 'level_1'), fresh)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    for name, p in fresh.named_parameters():
        expected = point[name].masked_fill(~masks[name], 0) if name in masks else point[name]
        assert torch.equal(p, expected), name


def test_conv1d_is_recognised_by_its_weight_shape_like_any_custom_matrix_layer():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))
            self.scale = nn.Parameter(torch.randn(3, 4))

    model = nn.Sequential(Conv1D(4, 3), Custom(), nn.Bilinear(2, 3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    assert set(prunable_weights(model)) == {'0.weight', '1.weight', '2.weight'}


def test_multihead_attention_input_projections_are_prunable_packed_or_not():
    packed = nn.Sequential(nn.MultiheadAttention(8, 2))
    assert set(prunable_weights(packed)) == {'0.in_proj_weight', '0.out_proj.weight'}
    separate = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=6))
    assert set(prunable_weights(separate)) == {'0.q_proj_weight', '0.k_proj_weight', '0.v_proj_weight',
                                               '0.out_proj.weight'}
    assert set(prunable_weights(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16))) == {
        'self_attn.in_proj_weight', 'self_attn.out_proj.weight', 'linear1.weight', 'linear2.weight'}


class Standardize(nn.Module):
    def forward(self, weight):
        flat = weight.flatten(1)
        return ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).view_as(weight)


def test_a_parametrized_conv_is_pruned_through_its_original_and_rewinds_by_that_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    parametrize.register_parametrization(model[0], 'weight', Standardize())
    weights = prunable_weights(model)
    assert list(weights) == ['0.parametrizations.weight.original', '2.weight']
    assert weights['0.parametrizations.weight.original'] is model[0].parametrizations.weight.original

    point = snapshot(model)
    masks = magnitude_masks(model, 0.5)
    perturb(model)
    rewind(model, point, masks)
    original = model[0].parametrizations.weight.original
    expected = point['0.parametrizations.weight.original'].masked_fill(~masks['0.parametrizations.weight.original'], 0)
    assert torch.equal(original, expected) and (original == 0).sum() > 0
    model(torch.randn(2, 3, 3, 3))


def test_of_several_originals_only_those_shaped_like_the_weight_are_pruned():
    model = nn.Sequential(weight_norm(nn.Linear(4, 3)))
    assert model[0].parametrizations.weight.original0.shape == (3, 1)
    assert set(prunable_weights(model)) == {'0.parametrizations.weight.original1'}


def test_bert_prunes_every_linear_weight_and_its_embeddings_only_when_asked():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100))
    linear = {f'{n}.weight' for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    embedding = {f'{n}.weight' for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert len(linear) == 2 * 6 + 2 and len(embedding) == 3
    assert set(prunable_weights(model)) == linear
    assert set(prunable_weights(model, embeddings=True)) == linear | embedding


def test_coverage_counts_every_weight_tensor_once_and_names_what_is_left_out():
    model = gpt2()
    coverage = prunable_coverage(model, prunable_weights(model))
    embedded = 64 * 32 + 32 * 32  # wte (also lm_head) and wpe
    conv1d = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)
    assert coverage.left_out == {'transformer.wte.weight': 64 * 32, 'transformer.wpe.weight': 32 * 32}
    assert coverage.fraction == pytest.approx(conv1d / (conv1d + embedded))
    assert prunable_coverage(model, prunable_weights(model, embeddings=True)) == (1.0, {})
    with pytest.raises(ValueError, match=r"weights: \['x'\] are not parameters of model"):
        prunable_coverage(model, {'x': nn.Parameter(torch.ones(2, 2))})


def test_coverage_warning_fires_on_a_mostly_embedding_model_and_says_how_to_include_it():
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 10), nn.LayerNorm(10))
    message = coverage_warning(model, prunable_weights(model))
    assert message == ("IMP prunes only 1.0% of the model's weights; left out: 0.weight (embedding, 64,000); "
                       'pass embeddings=True to prune the embeddings too')
    assert coverage_warning(model, prunable_weights(model, embeddings=True)) is None


def test_coverage_warning_lists_the_largest_left_out_weights_first_and_blames_ignore_when_no_embedding():
    model = nn.Sequential(*[nn.Linear(8 + i, 8 + i + 1) for i in range(7)], nn.Linear(15, 2))
    message = coverage_warning(model, prunable_weights(model, ignore=[f'{i}.weight' for i in range(7)]))
    assert message.startswith("IMP prunes only 3.1% of the model's weights; left out: 6.weight (210), "
                              '5.weight (182), 4.weight (156), 3.weight (132), 2.weight (110) and 2 more; ')
    assert message.endswith('check `ignore`')
    assert coverage_warning(model, prunable_weights(model)) is None
