#!/bin/sh
# Every stage of the large-batch study (STUDY.md), in order. Each stage skips the
# runs it finished before, so rerunning this script after an interruption resumes
# where it stopped:  nohup sh experiments/study_queue.sh > study.log 2>&1 &
# It runs the fair protocol: every rate and warm-up chosen on a held-out split,
# the same budget for every optimizer (STUDY.md).
# STUDY_OUTPUT_DIR names the folder of the per-run JSONs (default: the
# committed experiments/results, whose finished runs are then skipped).
set -e
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
study="nice python -m experiments.large_batch_study"
study="$study --output_dir=${STUDY_OUTPUT_DIR:-experiments/results}"

# The fair protocol, MNIST with the BN net, 3 epochs, BN statistics recomputed
# after training. Per batch and optimizer: 3 rates at 1 warm-up epoch (at the
# base batch a factor 4 apart; above it from square-root to linear scaling of
# the base batch's choice), one more past an edge, the best rate with 2 warm-up
# epochs; the best on the held-out split then runs with seeds 1 and 2. Ordered
# by what matters most if the queue is cut short.
fair="$study --precise_bn"
# F1. SGD and LARS: the selection at the base batch and at 64x (the largest)
#     first, then the seeds at 64x, then those at the base batch.
$fair --optimizers=sgd,lars --batch_sizes=128,8192 --repeat_seeds=
$fair --optimizers=sgd,lars --batch_sizes=8192
$fair --optimizers=sgd,lars --batch_sizes=128
# F2. The reality check at the largest batch: Nesterov momentum and Keras Lamb,
#     selected the same way. Lamb's base-batch choice anchors its grid (no
#     extra seeds at the base batch); Nesterov's grid scales SGD's choice.
$fair --optimizers=lamb --batch_sizes=128 --repeat_seeds=
$fair --optimizers=nesterov,lamb --batch_sizes=8192
# F2b. Outside the equal budget: Nesterov's three rates at 8192 (peaks 1.6-12.8)
#      all failed to train (44-66%) and the best lay inside the grid, so the
#      rule tried no lower rate. Nesterov at SGD's chosen 8192 setting, 3 seeds.
$fair --optimizers=nesterov --batch_sizes=8192 --fixed_base_lr=0.008839 \
    --warmup_epochs=2
# F3. 32x the base (the grids above run first: this may not be reached today).
$fair --optimizers=sgd,lars --batch_sizes=4096
$fair --optimizers=nesterov,lamb --batch_sizes=4096
# F4. Train longer at 64x (the paper's Table 5): every optimizer at 8192 for 10
#     epochs (60 steps) with the same budget and selection, the base batch kept
#     at its 3 epochs (its choices above are reused).
$fair --epochs=10 --base_epochs=3 --optimizers=sgd,lars --batch_sizes=8192
$fair --epochs=10 --base_epochs=3 --optimizers=nesterov,lamb --batch_sizes=8192
# F4b. Outside the equal budget, as in F2b: Nesterov at SGD's chosen 10-epoch
#      8192 setting, 3 seeds.
$fair --epochs=10 --base_epochs=3 --optimizers=nesterov --batch_sizes=8192 \
    --fixed_base_lr=0.025 --warmup_epochs=2
# F5. Equal epochs: the base batch's 3-epoch choices trained 10 epochs, 3 seeds
#     (outside the budget: no selection at that length).
$fair --epochs=10 --optimizers=lars --batch_sizes=128 --fixed_base_lr=4 --warmup_epochs=1
$fair --epochs=10 --optimizers=sgd --batch_sizes=128 --fixed_base_lr=0.2 --warmup_epochs=1
# I1. The second data set: Imagenette at 32x32 (needs runs/imagenette37:
#     STUDY.md, "How to reproduce"), base batch 64 for 10 epochs and 32x (2048) for 40
#     epochs (160 steps; trained longer as in F4), SGD and LARS, the same
#     selection, then seeds 1 and 2 at both batches.
in32="$fair --part=imagenette32 --epochs=40 --base_epochs=10"
$in32 --optimizers=sgd,lars --batch_sizes=64,2048
# I2. The reality check at 32x: Nesterov (SGD's base choice anchors its grid) and
#     Lamb (its own base-batch selection first, no extra seeds there).
$in32 --optimizers=lamb --batch_sizes=64 --repeat_seeds=
$in32 --optimizers=nesterov,lamb --batch_sizes=2048
# I3. Outside the equal budget: SGD's best 2048 rate lay on the grid's lower
#     edge even after the one extension (peaks 0.48-6.4 tried): one grid step
#     lower (peak 0.20) with 5 warm-up epochs, 3 seeds.
$in32 --optimizers=sgd --batch_sizes=2048 --fixed_base_lr=0.006253 --warmup_epochs=5
# I4. Equal epochs, as F5: the base batch's 10-epoch choices trained 40 epochs.
$fair --part=imagenette32 --epochs=40 --optimizers=lars --batch_sizes=64 \
    --fixed_base_lr=4 --warmup_epochs=5
$fair --part=imagenette32 --epochs=40 --optimizers=sgd --batch_sizes=64 \
    --fixed_base_lr=0.2 --warmup_epochs=5
# I5. Outside the budget, as I3: Nesterov and Lamb chose their grids' lower
#     edges too; one grid step lower, seed 0 only (neither beat its choice on
#     the held-out split, so no more seeds).
$in32 --optimizers=nesterov --batch_sizes=2048 --fixed_base_lr=0.006253 \
    --warmup_epochs=5 --repeat_seeds=
$in32 --optimizers=lamb --batch_sizes=2048 --fixed_base_lr=0.0005 \
    --warmup_epochs=2 --repeat_seeds=
# I6. Equal epochs the other way: 2048 for the base's 10 epochs (40 steps),
#     SGD and LARS with the same selection.
$fair --part=imagenette32 --epochs=10 --optimizers=sgd,lars --batch_sizes=2048
# F6. MNIST without BN, 3 epochs, base and 32x, SGD and LARS.
nobn="$fair --model=small_alexnet"
$nobn --optimizers=sgd,lars --batch_sizes=128,4096 --repeat_seeds=
$nobn --optimizers=sgd,lars --batch_sizes=4096
$nobn --optimizers=sgd,lars --batch_sizes=128
# F6b. Outside the budget: both 4096 choices lay on their grids' lower edge.
#      LARS one step lower (seed 0) was worse. SGD one step lower (3 seeds)
#      was better on the held-out split, so two steps (seed 0, better again),
#      three (worse), then the best, two steps lower, with 3 seeds.
$nobn --optimizers=lars --batch_sizes=4096 --fixed_base_lr=0.125 \
    --warmup_epochs=2 --repeat_seeds=
$nobn --optimizers=sgd --batch_sizes=4096 --fixed_base_lr=0.001563 --warmup_epochs=1
for rate in 0.000657 0.0002763; do
    $nobn --optimizers=sgd --batch_sizes=4096 --fixed_base_lr=$rate \
        --warmup_epochs=1 --repeat_seeds=
done
$nobn --optimizers=sgd --batch_sizes=4096 --fixed_base_lr=0.000657 --warmup_epochs=1
# R. The pre-registered residual-net test (STUDY.md): resnet8 on Imagenette-32,
#    SGD and LARS, weight decay 1e-4, BN recomputed (the part's defaults).
#    R1 the base batch's selection, R2 2048's at 40 epochs, R3 2048's at 80
#    epochs (the base kept at 40: its choice anchors both grids), then seeds
#    1-3 of all six cells.
r8="$study --part=imagenette32_resnet8"
$r8 --batch_sizes=64 --repeat_seeds=
$r8 --batch_sizes=2048 --repeat_seeds=
$r8 --epochs=80 --base_epochs=40 --batch_sizes=2048 --repeat_seeds=
$r8 --batch_sizes=64,2048
$r8 --epochs=80 --base_epochs=40 --batch_sizes=2048
