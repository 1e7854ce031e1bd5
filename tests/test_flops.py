"""FLOPs accounting (``composer_imp.functional.flops``): batches of any structure, sequence length, weights found by
tensor identity, torch's FLOP counter where torch-pruning cannot count, and the parameter-count fallback."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from transformers import BatchEncoding
from transformers.pytorch_utils import Conv1D

from composer_imp.functional import prunable_weights
from composer_imp.functional.flops import first_tensor, layer_macs, sparse_macs

B, S, D, VOCAB = 3, 7, 8, 11


class TinyLM(nn.Module):
    """A ComposerModel-like forward: the whole batch (a mapping with ``input_ids``) is one argument."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.block = block

    def forward(self, batch):
        return self.block(self.embed(batch['input_ids']))


def token_batch():
    ids = torch.randint(0, VOCAB, (B, S))
    return BatchEncoding({'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'total_tokens': [S] * B})


def macs_of(model, batch):
    return layer_macs(model, (batch,), prunable_weights(model))


def test_first_tensor_is_found_depth_first_in_any_batch_structure():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert first_tensor(x) is x and first_tensor((x, y)) is x and first_tensor([[], {'a': [x]}, y]) is x
    assert first_tensor({'labels': y, 'input_ids': x}) is y  # a mapping's own order
    assert first_tensor(BatchEncoding({'total_tokens': [1, 2], 'input_ids': x})) is x
    assert first_tensor({'text': ['no tensor']}) is None


def test_a_batch_encoding_gives_macs_per_sequence_and_per_token():
    model = TinyLM(nn.Sequential(nn.Linear(D, 2 * D, bias=False), nn.ReLU(), nn.Linear(2 * D, D, bias=False)))
    macs = macs_of(model, token_batch())
    assert macs['method'] == 'torch-pruning' and macs['sequence_length'] == S
    assert macs['weights'] == {'block.0.weight': S * D * 2 * D, 'block.2.weight': S * 2 * D * D}
    assert macs['dense'] == pytest.approx(sum(macs['weights'].values()) + S * 2 * D)  # + the ReLU's elements
    assert macs['dense_per_token'] == pytest.approx(macs['dense'] / S)


def test_image_batches_have_no_sequence_length_and_a_tuple_batch_uses_its_inputs():

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)

        def forward(self, batch):
            return self.conv(batch[0])

    model = Classifier()
    macs = macs_of(model, (torch.randn(B, 3, 6, 6), torch.zeros(B, dtype=torch.long)))
    assert macs['method'] == 'torch-pruning' and macs['sequence_length'] is None and macs['dense_per_token'] is None
    assert macs['weights'] == {'conv.weight': 3 * 9 * 4 * 4 * 4} == {'conv.weight': macs['dense']}


def test_parametrized_packed_and_tied_weights_are_found_by_identity():

    class Scale(nn.Module):
        def forward(self, weight):
            return 2 * weight

    parametrized = nn.Linear(D, D, bias=False)
    parametrize.register_parametrization(parametrized, 'weight', Scale())
    tied_a, tied_b = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
    tied_b.weight = tied_a.weight

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.parametrized, self.tied_a, self.tied_b = parametrized, tied_a, tied_b
            self.attention = nn.MultiheadAttention(D, 2, batch_first=True)

        def forward(self, x):
            x = self.tied_b(self.tied_a(self.parametrized(x)))
            return self.attention(x, x, x, need_weights=False)[0]

    macs = macs_of(TinyLM(Block()), token_batch())
    weights = macs['weights']
    assert set(weights) == {'block.parametrized.parametrizations.weight.original', 'block.tied_a.weight',
                            'block.attention.in_proj_weight', 'block.attention.out_proj.weight'}
    assert weights['block.parametrized.parametrizations.weight.original'] == S * D * D
    assert weights['block.tied_a.weight'] == 2 * S * D * D  # used by two layers
    # the attention's count is shared between its two weights by element count (3:1), not given to each in full
    assert weights['block.attention.in_proj_weight'] == pytest.approx(3 * weights['block.attention.out_proj.weight'])
    assert sum(weights.values()) <= macs['dense']
    assert sparse_macs(macs['dense'], weights, dict.fromkeys(weights, 0.0)) >= 0


class FunctionalLM(nn.Module):
    """Only functional ops, which torch-pruning does not count."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(VOCAB, D))
        self.proj = nn.Parameter(torch.randn(D, D))

    def forward(self, batch):
        return F.linear(F.embedding(batch['input_ids'], self.embed), self.proj)


def test_layers_torch_pruning_does_not_count_are_counted_by_torchs_flop_counter():
    gpt2_like = TinyLM(nn.Sequential(Conv1D(2 * D, D), nn.GELU(), Conv1D(D, 2 * D)))
    macs = macs_of(gpt2_like, token_batch())
    assert macs['method'] == 'torch-flop-counter' and 'torch-pruning counted none' in macs['fallback_reason']
    assert macs['weights'] == {'block.0.weight': S * D * 2 * D, 'block.2.weight': S * 2 * D * D}
    assert macs['dense'] == S * 4 * D * D  # the matrix multiplies; the embedding lookup costs nothing here

    model = FunctionalLM()  # the weight is applied by F.linear in the model's own forward
    macs = layer_macs(model, (token_batch(),), ['proj'])
    assert macs['method'] == 'torch-flop-counter' and macs['weights'] == {'proj': S * D * D}
    assert macs['dense'] == S * D * D and macs['dense_per_token'] == D * D


def test_a_model_torch_pruning_cannot_copy_is_counted_in_place_and_left_as_it_was():
    """torch-pruning deep-copies the model (FSDP2 forbids it; a lock cannot be copied): torch's counter runs on the
    model itself, in eval mode without gradients, and gives every flag back."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                        nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 64, 10))
    net.lock = threading.Lock()
    net[3].eval()  # one submodule's own flag, which must survive
    before = {k: v.clone() for k, v in net.state_dict().items()}
    macs = layer_macs(net, (torch.randn(4, 1, 8, 8),), ['0.weight', '4.weight', '6.weight'])
    assert macs['method'] == 'torch-flop-counter' and macs['fallback_reason'].startswith('torch-pruning failed (TypeError')
    # per sample: output positions x (input channels x kernel size) for the convs, in x out for the linear layer
    assert macs['weights'] == {'0.weight': 8 * 64 * 1 * 9, '4.weight': 16 * 64 * 8 * 9, '6.weight': 16 * 64 * 10}
    assert macs['dense'] == sum(macs['weights'].values())
    assert net.training and not net[3].training and all(m.training for i, m in enumerate(net) if i != 3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics untouched


class ElementwiseOnly(nn.Module):
    """A 2-D weight used element-wise: no counter sees a multiply-accumulate."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(B, S))

    def forward(self, batch):
        return batch['input_ids'].float() * self.scale


def test_when_no_counter_counts_a_prunable_layer_one_mac_per_parameter_and_token_is_the_estimate():
    model = ElementwiseOnly()
    macs = layer_macs(model, (token_batch(),), ['scale'])
    assert macs['method'] == 'parameter-count'
    assert macs['fallback_reason'] == ('torch-pruning counted none of the prunable layers; torch-flop-counter counted '
                                       'none of the prunable layers')
    assert macs['weights'] == {'scale': S * B * S} and macs['dense'] == S * B * S


def test_a_batch_without_tensors_raises_one_line_naming_the_argument():
    with pytest.raises(ValueError, match='example_inputs: holds no tensor'):
        layer_macs(FunctionalLM(), ({'text': ['a b c']},), ['proj'])
