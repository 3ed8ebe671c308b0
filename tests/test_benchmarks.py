"""The benchmark's FLOP counts against the layer arithmetic done by hand."""
from benchmarks.common import forward_flops
from dfkd.data import DataInfo
from dfkd.models import build_model

MNIST = DataInfo((1, 28, 28), 10)


def test_forward_flops_of_the_reference_networks():
    # LeNet-5 on 32x32: conv1 1->6 5x5 -> 28x28, conv2 6->16 5x5 -> 10x10, fc 400-120-84-10
    lenet = 2 * (25 * 6 * 28 * 28 + 6 * 25 * 16 * 10 * 10 + 400 * 120 + 120 * 84 + 84 * 10)
    assert forward_flops(build_model("lenet5", MNIST)[0], (1, 32, 32)) == lenet == 833_040
    assert forward_flops(build_model("lenet5-half", MNIST)[0], (1, 32, 32)) == 2 * (
        25 * 3 * 28 * 28 + 3 * 25 * 8 * 10 * 10 + 200 * 120 + 120 * 84 + 84 * 10)
    assert forward_flops(build_model("hinton-1200", MNIST)[0], (1, 28, 28)) == 2 * (784 * 1200 + 1200 * 1200
                                                                                    + 1200 * 10)
