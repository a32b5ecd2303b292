"""DeepFlow's structure is the paper's, not merely something that runs."""

import pytest
import torch
from torch import nn

from engines.deepflow import (
    CHANNEL_PLAN,
    ConvBNReLU,
    DeepFlow,
    Normal,
    NormalModule,
    Reduction,
    ReductionModule,
    create_deepflow,
)

PAPER_PLAN = [(32, 32), (32, 48), 80, (112, 48), (96, 64), (80, 80), (48, 96), 96, (176, 160), (176, 160), 96, (176, 160), (176, 160)]


def conv_of(unit: ConvBNReLU) -> nn.Conv2d:
    conv, bn, relu = unit
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    return conv


def test_channel_plan_is_the_papers() -> None:
    plan = [spec.conv3x3 if isinstance(spec, Reduction) else (spec.conv1x1, spec.conv3x3) for spec in CHANNEL_PLAN]
    assert plan == PAPER_PLAN


def test_thirteen_dual_path_modules_of_the_right_kinds() -> None:
    model = create_deepflow(num_classes=5)
    modules = list(model.features)
    assert len(modules) == 13
    kinds = ["R" if isinstance(m, ReductionModule) else "N" for m in modules]
    assert kinds == ["N", "N", "R", "N", "N", "N", "N", "R", "N", "N", "R", "N", "N"]
    assert all(isinstance(m, (NormalModule, ReductionModule)) for m in modules)


def test_stem_and_unit_geometry() -> None:
    model = create_deepflow(num_classes=5)
    stem = conv_of(model.stem)
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (2, 96, (3, 3), (1, 1))
    in_channels = 96
    for module, spec in zip(model.features, CHANNEL_PLAN):
        if isinstance(spec, Normal):
            one, three = conv_of(module.branch1x1), conv_of(module.branch3x3)
            assert (one.kernel_size, one.stride, one.out_channels) == ((1, 1), (1, 1), spec.conv1x1)
            assert (three.kernel_size, three.stride, three.out_channels) == ((3, 3), (1, 1), spec.conv3x3)
            assert one.in_channels == three.in_channels == in_channels
            in_channels = spec.conv1x1 + spec.conv3x3
        else:
            conv = conv_of(module.branch3x3)
            assert (conv.kernel_size, conv.stride, conv.out_channels) == ((3, 3), (2, 2), spec.conv3x3)
            pool = module.branch_pool
            assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride) == (3, 2)
            in_channels = spec.conv3x3 + in_channels
    assert in_channels == 336 == model.embedding_dim
    assert model.classifier.in_features == 336 and model.classifier.out_features == 5


@pytest.mark.parametrize(("size", "final"), [(32, 4), (40, 5), (33, 5), (64, 8), (66, 9)])
def test_output_shapes_for_input_sizes(size: int, final: int) -> None:
    model = create_deepflow(num_classes=7, input_size=size).eval()
    x = torch.randn(3, 2, size, size)
    with torch.no_grad():
        maps = model.features(model.stem(x))
        logits, embedding = model(x)
    assert maps.shape == (3, 336, final, final)
    assert model.feature_map_size == final
    assert logits.shape == (3, 7) and embedding.shape == (3, 336)
    assert torch.allclose(embedding, maps.mean(dim=(2, 3)), atol=1e-5)


def test_configurable_channels_and_classes() -> None:
    model = create_deepflow(num_classes=3, in_channels=3, input_size=40).eval()
    with torch.no_grad():
        logits, embedding = model(torch.randn(2, 3, 40, 40))
    assert logits.shape == (2, 3) and embedding.shape == (2, 336)


def test_width_multiplier_gives_smaller_students() -> None:
    full = create_deepflow(num_classes=5)
    student = create_deepflow(num_classes=5, width=0.25)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(student) < params(full) / 8
    assert student.embedding_dim < 336 and student.embedding_dim % 8 == 0
    with torch.no_grad():
        logits, embedding = student.eval()(torch.randn(2, 2, 64, 64))
    assert logits.shape == (2, 5) and embedding.shape == (2, student.embedding_dim)


@pytest.mark.parametrize("kwargs", [{"input_size": 31}, {"num_classes": 0}, {"in_channels": 0}, {"width": 0.0}])
def test_invalid_configuration_is_refused(kwargs: dict) -> None:
    args = {"num_classes": 5, **kwargs}
    with pytest.raises(ValueError):
        DeepFlow(**args)
