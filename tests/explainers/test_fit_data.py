"""iter_images: the one reader of fit data (PatternNet, DeepSHAP's background, influence)."""

from __future__ import annotations

import pytest
import torch

from xaudit.explainers.fit_data import iter_images
from xaudit.utils.errors import ConfigError


def test_every_kind_of_data_gives_float_image_batches() -> None:
    x = torch.rand(5, 3, 4, 4)
    y = torch.tensor([0, 1, 0, 1, 1])
    assert [b.shape[0] for b in iter_images(x, batch_size=2)] == [2, 2, 1]
    assert torch.equal(torch.cat(list(iter_images([{"image": x, "label": y}]))), x)
    assert torch.equal(torch.cat(list(iter_images([(x, y)], of_class=1))), x[y == 1])
    assert torch.equal(torch.cat(list(iter_images([{"image": x, "label": y}], of_class=0))), x[y == 0])
    assert next(iter_images([x[0]])).shape == (1, 3, 4, 4)  # one image [C,H,W] is a batch of one
    assert list(iter_images([{"image": x, "label": y}], of_class=7)) == []  # empty batches skipped
    assert len(list(iter_images([x, x, x], max_batches=2))) == 2


def test_bad_data_names_the_problem() -> None:
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ConfigError, match="of_class needs labels"):
        list(iter_images([x], of_class=0))
    with pytest.raises(ConfigError, match="needs a 'label' entry"):
        list(iter_images([{"image": x}], of_class=0))
    with pytest.raises(ConfigError, match="needs an 'image' key"):
        list(iter_images([{"pixels": x}]))
    with pytest.raises(ConfigError, match="float image tensors"):
        list(iter_images([x.to(torch.uint8)]))
    with pytest.raises(ConfigError, match="fit data must be"):
        list(iter_images(3))
