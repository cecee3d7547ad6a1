"""Tests of experiments/table2_alexnet.py: Caffe's initialisation, the table."""

import math

import numpy as np

from experiments import table2_alexnet as table2


def test_caffe_initialisation_gives_the_norms_the_paper_prints():
    model = table2.caffe_alexnet(seed=0)
    # Hand counts: ||w|| of n Gaussian entries of std s is about sqrt(n) * s.
    kernel_sizes = {
        "conv1": 11 * 11 * 3 * 96,
        "conv2": 5 * 5 * 48 * 256,  # Two groups.
        "fc6": 6 * 6 * 256 * 4096,
        "fc8": 4096 * 1000,
    }
    for name, size in kernel_sizes.items():
        layer = model.get_layer(name)
        std, bias = table2.CAFFE_INIT[name]
        assert math.prod(layer.kernel.shape) == size
        norm = np.linalg.norm(layer.kernel.numpy())
        assert abs(norm / (math.sqrt(size) * std) - 1) < 0.01
        np.testing.assert_allclose(layer.bias.numpy(), bias)
        # Against the paper's printed weight norm (its ".b" column).
        assert abs(norm / table2.PAPER_TABLE2[name][0][0] - 1) < 0.01
    lrn = [
        layer
        for layer in model.layers
        if type(layer).__name__ == "LocalResponseNormalization"
    ]
    assert len(lrn) == 2 and all(
        (layer.bias, layer.alpha) == (1.0, 2e-5) for layer in lrn
    )


def test_comparison_table_puts_ours_beside_the_paper_with_labels_swapped():
    norms = {name: ((2.0, 0.5), (0.1, 0.001)) for name in table2.PAPER_TABLE2}
    rows = table2.comparison_table(norms).splitlines()
    assert len(rows) == 2 + 2 * len(table2.PAPER_TABLE2)
    # conv1's weights: ours 2 / 0.5 = 4; the paper's ".b" column 1.86 / 0.22 / 8.48.
    assert rows[2] == "| conv1.w | 2 | 1.86 | 0.5 | 0.22 | 4 | 8.48 |"
    assert rows[3] == "| conv1.b | 0.1 | 0.098 | 0.001 | 0.017 | 100 | 5.76 |"
