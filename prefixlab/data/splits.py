"""Splitting labeled examples into a training and a validation part, stratified by label."""

from __future__ import annotations

import random
from collections import Counter

from sklearn.model_selection import train_test_split

from prefixlab.data.labeled import LabeledData
from prefixlab.data.messages import LIST_LIMIT, short


def stratified_split(
    data: LabeledData, validation_share: float, seed: int
) -> tuple[LabeledData, LabeledData]:
    """(train, validation), deterministic for a seed, each in file order.

    Every label with at least 2 examples appears in train; a label with a single example goes
    to train only, with a warning appended to train's warnings. Stratified with scikit-learn
    when the counts allow it, else split per label by hand.
    """
    if not 0 < validation_share < 1:
        raise ValueError(f"validation_share must be between 0 and 1, got {validation_share}")
    counts = Counter(data.labels)
    singles = [i for i, label in enumerate(data.labels) if counts[label] == 1]
    pool = [i for i, label in enumerate(data.labels) if counts[label] > 1]
    train_idx, val_idx = list(singles), []
    if pool:
        pool_labels = [data.labels[i] for i in pool]
        try:
            tr, va = train_test_split(
                pool, test_size=validation_share, random_state=seed, stratify=pool_labels
            )
        except ValueError:  # fewer validation or training slots than labels
            tr, va = _split_per_label(pool, pool_labels, validation_share, seed)
        tr, va = _cover_labels(list(tr), list(va), data.labels)
        train_idx += tr
        val_idx += va

    train = data.subset(sorted(train_idx))
    validation = data.subset(sorted(val_idx))
    if singles:
        shown = ", ".join(
            f"{short(data.labels[i])} (row {data.rows[i]})" for i in singles[:LIST_LIMIT]
        )
        more = f" and {len(singles) - LIST_LIMIT} more" if len(singles) > LIST_LIMIT else ""
        train.warnings.append(
            f"{len(singles)} label{'s' if len(singles) > 1 else ''} with a single example "
            f"went to the training part only: {shown}{more}"
        )
    if not validation.texts:
        train.warnings.append(
            f"the validation part is empty: {len(data)} examples are too few for a "
            f"{validation_share:.0%} validation share"
        )
    return train, validation


def _split_per_label(
    pool: list[int], labels: list[str], share: float, seed: int
) -> tuple[list[int], list[int]]:
    """Shuffle each label's examples with `seed`; round(share * n) of them (at most n - 1)
    go to validation."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for index, label in zip(pool, labels, strict=True):
        by_label.setdefault(label, []).append(index)
    train, val = [], []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        k = min(round(share * len(members)), len(members) - 1)
        val += members[:k]
        train += members[k:]
    return train, val


def _cover_labels(
    train: list[int], val: list[int], labels: list[str]
) -> tuple[list[int], list[int]]:
    """Move one validation example into train for each label that train lacks."""
    present = {labels[i] for i in train}
    for i in list(val):
        if labels[i] not in present:
            val.remove(i)
            train.append(i)
            present.add(labels[i])
    return train, val
