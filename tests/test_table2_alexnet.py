"""Tests of experiments/table2_alexnet.py: Caffe's initialisation, the table."""

import math
import os

import numpy as np
import pytest

from experiments import table2_alexnet as table2


@pytest.fixture(scope="module")
def paper():
    if not os.path.isfile(table2.PAPER_TABLES):
        pytest.skip(f"the paper's tables are not at {table2.PAPER_TABLES}")
    return table2.read_paper_table2(table2.PAPER_TABLES)


def test_paper_table2_is_read_with_its_labels_swapped(paper):
    assert sorted(paper) == sorted(table2.CAFFE_INIT)
    # TABLES.md prints conv1.b = (1.86, 0.22, 8.48), conv1.w = (0.098, 0.017,
    # 5.76), fc6.w = (6.4, 0.005, 1345): ".b" is the weights, ".w" the biases.
    assert paper["conv1"] == ((1.86, 0.22, 8.48), (0.098, 0.017, 5.76))
    assert paper["fc6"][1] == (6.4, 0.005, 1345.0)


def test_a_table_without_a_layer_is_named(tmp_path):
    path = tmp_path / "TABLES.md"
    path.write_text(
        "## Table 2 — AlexNet\n| layer | conv1.b | conv1.w |\n|---|---|---|\n"
        "| norm w | 1.86 | 0.098 |\n| norm grad | 0.22 | 0.017 |\n"
        "| ratio | 8.48 | 5.76 |\n\n## Table 3\n| batch | x |\n"
    )
    with pytest.raises(ValueError, match=r"TABLES.md: Table 2 has no column 'conv2.b'"):
        table2.read_paper_table2(str(path))


def test_caffe_initialisation_gives_the_norms_the_paper_prints(paper):
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
        assert abs(norm / paper[name][0][0] - 1) < 0.01
    lrn = [
        layer
        for layer in model.layers
        if type(layer).__name__ == "LocalResponseNormalization"
    ]
    assert len(lrn) == 2 and all(
        (layer.bias, layer.alpha) == (1.0, 2e-5) for layer in lrn
    )


def test_comparison_table_puts_ours_beside_the_paper_with_labels_swapped(paper):
    norms = {name: ((2.0, 0.5), (0.1, 0.001)) for name in paper}
    rows = table2.comparison_table(norms, paper).splitlines()
    assert len(rows) == 2 + 2 * len(paper)
    # conv1's weights: ours 2 / 0.5 = 4; the paper's ".b" column 1.86 / 0.22 / 8.48.
    assert rows[2] == "| conv1.w | 2 | 1.86 | 0.5 | 0.22 | 4 | 8.48 |"
    assert rows[3] == "| conv1.b | 0.1 | 0.098 | 0.001 | 0.017 | 100 | 5.76 |"


def test_a_table_with_a_row_that_is_not_numbers_is_named(tmp_path):
    path = tmp_path / "TABLES.md"
    path.write_text(
        "## Table 2\n| layer | conv1.b | conv1.w |\n| norm w | 1.86 | n/a |\n"
    )
    with pytest.raises(ValueError, match=r"TABLES.md: Table 2 row .* is not 2 numbers"):
        table2.read_paper_table2(str(path))
    path.write_text("# Tables\n| layer | conv1.b |\n| norm w | 1.86 |\n")
    with pytest.raises(ValueError, match=r"TABLES.md: no '## Table 2' section"):
        table2.read_paper_table2(str(path))
