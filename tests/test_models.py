"""Models: every name builds a seeded ComposerClassifier with the published size and the right output shape."""
import pytest
import torch
from composer.models import ComposerClassifier
from torch import nn

from composer_imp.models import MODELS, build_model

# name -> (parameters for 10 classes, input shape of one image)
EXPECTED = {
    'lenet_300_100': (266_610, (1, 28, 28)),
    'conv2': (4_301_642, (3, 32, 32)),
    'conv4': (2_425_930, (3, 32, 32)),
    'conv6': (2_262_602, (3, 32, 32)),
    'cifar_resnet20': (272_474, (3, 32, 32)),
    'cifar_resnet32': (466_906, (3, 32, 32)),
    'cifar_resnet56': (855_770, (3, 32, 32)),
    'resnet18_cifar': (11_173_962, (3, 32, 32)),
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_is_tested():
    assert set(MODELS) == set(EXPECTED)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_model_has_the_expected_size_and_output_shape(name):
    size, shape = EXPECTED[name]
    model = build_model(name)
    assert isinstance(model, ComposerClassifier) and n_params(model) == size
    model.eval()
    with torch.no_grad():
        outputs = model((torch.randn(2, *shape), torch.zeros(2, dtype=torch.long)))
    assert outputs.shape == (2, 10)


@pytest.mark.parametrize('name', ['lenet_300_100', 'conv4', 'cifar_resnet20', 'resnet18_cifar'])
def test_model_is_deterministic_given_the_seed(name):
    def state(seed):
        torch.manual_seed(seed)
        return build_model(name).state_dict()

    first, again, other = state(3), state(3), state(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_num_classes_sets_the_output_layer_and_the_metrics():
    model = build_model('cifar_resnet32', num_classes=100)
    assert model.module.fc.out_features == 100 and model.num_classes == 100


def test_cifar_resnet_follows_open_lth():
    torch.manual_seed(0)
    net = build_model('cifar_resnet20').module
    assert [b.conv1.out_channels for b in net.blocks] == [16] * 3 + [32] * 3 + [64] * 3
    shortcuts = [b.shortcut for b in net.blocks if len(b.shortcut)]
    assert len(shortcuts) == 2 and all(s[0].kernel_size == (1, 1) and isinstance(s[1], nn.BatchNorm2d)
                                       for s in shortcuts)
    gammas = torch.cat([m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
    betas = torch.cat([m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
    assert 0 <= gammas.min() and gammas.max() <= 1 and gammas.std() > 0.2 and not betas.any()
    # kaiming_normal: std sqrt(2 / fan_in); the last stage's 3x3 convs have fan_in 64 * 9.
    assert abs(net.blocks[8].conv2.weight.std().item() - (2 / (64 * 9))**0.5) < 0.002
    assert not any(m.bias is not None for m in net.modules() if isinstance(m, nn.Conv2d))


def test_init_and_bn_init_options():
    torch.manual_seed(0)
    net = build_model('cifar_resnet20', bn_init='fixed', init='xavier_normal').module
    assert torch.equal(net.bn.weight, torch.ones(16))
    fc = build_model('lenet_300_100', init='xavier_normal').module.fc_layers[0]
    assert abs(fc.weight.std().item() - (2 / (784 + 300))**0.5) < 0.002
    with pytest.raises(ValueError, match="model.init 'glorot'.*allowed.*kaiming_normal"):
        build_model('conv2', init='glorot')
    with pytest.raises(ValueError, match="model.bn_init 'ones'"):
        build_model('cifar_resnet20', bn_init='ones')


def test_small_inputs_for_tests():
    conv = build_model('conv2', in_channels=1, image_size=28)
    resnet = build_model('cifar_resnet20', in_channels=1, width=4)
    x = (torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    assert conv(x).shape == resnet(x).shape == (2, 10)
    with pytest.raises(ValueError, match='model.image_size 30 is not divisible by 2\\*\\*3'):
        build_model('conv6', image_size=30)


def test_lenet_flattens_any_image_with_784_pixels():
    model = build_model('lenet_300_100')
    assert model((torch.randn(3, 784), None)).shape == model((torch.randn(3, 1, 28, 28), None)).shape == (3, 10)


def test_resnet18_cifar_keeps_32x32_resolution_in_the_stem():
    net = build_model('resnet18_cifar').module
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.Identity)


def test_torchvision_models_build_without_pretrained_weights():
    torch.manual_seed(0)
    model = build_model('torchvision/resnet18', num_classes=7)
    torch.manual_seed(0)
    again = build_model('torchvision/resnet18', num_classes=7)
    assert model.module.fc.out_features == 7 and torch.equal(model.module.conv1.weight, again.module.conv1.weight)
    assert n_params(build_model('torchvision/resnet50')) == 25_557_032


def test_unknown_names_raise_value_error_listing_the_allowed_names():
    with pytest.raises(ValueError, match=r"model.name 'resnet20' is unknown; allowed: \[.*'cifar_resnet20'.*torchvision/"):
        build_model('resnet20')
    with pytest.raises(ValueError, match="torchvision/'resnet7' is not a torchvision classification model"):
        build_model('torchvision/resnet7')
