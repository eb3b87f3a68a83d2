"""Which images must stay together in a split: the connected components of shared ids.

Two images belong together when they share a patient, or a lesion, or are a listed duplicate pair. Ids are
often partial (the ISIC Archive names the patient of some images only; ISIC 2019 has lesions and no patients;
ISIC 2020 lists duplicate pairs apart), so no single column is the group: an image of lesion L without a
patient id must still go wherever L's other images, whose patient is P, go, and with them every other lesion of
P. The groups are therefore the connected components of the graph whose edges are those links (scipy), and only
an image with none of them is a group of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def _values(frame: pd.DataFrame, column: str) -> pd.Series:
    """A link column as stripped strings, blanks as missing."""
    values = frame[column].astype("string").str.strip()
    return values.mask(values == "")


def connected_groups(
    frame: pd.DataFrame, link_columns: Sequence[str], pairs: Iterable[tuple[str, str]] = ()
) -> pd.Series:
    """A group id per row of `frame` (its `image_id` column and the `link_columns` it has): rows sharing a
    value in any link column, or named together in `pairs` (image ids), are one group, transitively.

    A group is named by its smallest value of the first link column that it has (patient before lesion, in
    the order given), else by its smallest image id; names are unique (a clash gets `#<image id>`). With one
    link column the groups are exactly its values, and images without one are their own groups.
    """
    ids = frame["image_id"].astype(str).to_numpy()
    n = len(ids)
    columns = [c for c in link_columns if c in frame.columns]
    rows, cols, offset = [np.arange(n)], [np.arange(n)], n
    for column in columns:
        values = _values(frame, column)
        present = values.notna().to_numpy()
        codes, uniques = pd.factorize(values[present])
        rows.append(np.flatnonzero(present))
        cols.append(codes + offset)
        offset += len(uniques)
    index = pd.Index(ids)
    for a, b in pairs:
        i, j = index.get_indexer([a, b])
        if i >= 0 and j >= 0:
            rows.append(np.array([i]))
            cols.append(np.array([j]))
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(offset, offset))
    labels = connected_components(graph, directed=False)[1][:n]

    parts = pd.DataFrame({"component": labels, "image_id": ids})
    name = pd.Series(pd.NA, index=pd.RangeIndex(labels.max() + 1 if n else 0), dtype="string")
    for column in columns:
        smallest = _values(frame, column).set_axis(parts.index).groupby(parts["component"]).min()
        name = name.fillna(smallest.reindex(name.index))
    name = name.fillna(parts.groupby("component")["image_id"].min().reindex(name.index).astype("string"))
    clash = name.duplicated(keep="first")
    if clash.any():
        first_image = parts.groupby("component")["image_id"].min()
        name[clash] = name[clash] + "#" + first_image[clash[clash].index].astype("string")
    return pd.Series(name.to_numpy()[labels], index=frame.index, dtype=str)


def id_counts(frame: pd.DataFrame, columns: Sequence[str], split_column: str = "split") -> dict:
    """Per id column present (patient_id, lesion_id, group_id): distinct ids per split, and ids found in more
    than one split (0 for a leak-free split)."""
    out = {}
    for column in (c for c in columns if c in frame.columns):
        values = _values(frame, column)
        known = frame.assign(_id=values)[values.notna()]
        per_split = known.groupby(split_column)["_id"].nunique()
        out[column] = {
            "per_split": {s: int(per_split.get(s, 0)) for s in sorted(frame[split_column].unique())},
            "total": int(known["_id"].nunique()),
            "shared_across_splits": int((known.groupby("_id")[split_column].nunique() > 1).sum()),
        }
    return out
