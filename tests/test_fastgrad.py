"""The fold route to a convolution's input gradient against autograd's own, in float64."""
import pytest
import torch
from torch import nn

from dfkd.fastgrad import eligible, input_grad_by_fold


@pytest.mark.parametrize("cin, cout, k, stride, padding, hw", [(1, 6, 5, 1, 0, 32), (3, 8, 3, 2, 1, 17),
                                                                (2, 4, (3, 5), (1, 2), (2, 1), 12)])
def test_input_gradient_equals_autograd(cin, cout, k, stride, padding, hw):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding).double().requires_grad_(False)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten())
    x = torch.rand(5, cin, hw, hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(model(x).shape[1], dtype=torch.float64)
    (ref,) = torch.autograd.grad(model(x) @ w, x, torch.ones(5, dtype=torch.float64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with input_grad_by_fold(model) as switched:
        assert switched == ["0"]
        out = model(x)
        (got,) = torch.autograd.grad(out @ w, x, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(out, model(x), atol=1e-12)  # the forward is the same function
    assert (got - ref).abs().max().item() < 1e-10 * ref.abs().max().item()
    assert "forward" not in conv.__dict__  # restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_only_frozen_plain_convolutions_with_few_input_channels_are_switched():
    assert not eligible(nn.Conv2d(1, 4, 3))  # trainable
    assert eligible(nn.Conv2d(1, 4, 3).requires_grad_(False))
    assert not eligible(nn.Conv2d(16, 4, 3).requires_grad_(False))
    assert not eligible(nn.Conv2d(2, 4, 3, groups=2).requires_grad_(False))
    assert not eligible(nn.Conv2d(1, 4, 3, dilation=2).requires_grad_(False))
    assert not eligible(nn.Conv2d(1, 4, 3, padding="same").requires_grad_(False))
    assert not eligible(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect").requires_grad_(False))
    model = nn.Sequential(nn.Conv2d(1, 4, 3).requires_grad_(False))
    with input_grad_by_fold(model, enabled=False) as switched:
        assert switched == []
