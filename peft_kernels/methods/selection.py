"""Which adapter each row of a batch uses: one normalisation shared by every method."""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

Selection = Union[None, str, Sequence[Optional[str]]]


def per_row(selection: Selection, rows: int, known: Sequence[str], what: str = "adapter") -> list[Optional[str]]:
    """A name (or None = base model) for each of ``rows`` rows.

    Semantics: a string applies to every row; a sequence gives one entry per row; None means
    "the only loaded one" (an error when several are loaded). Unknown names raise ValueError
    listing what is loaded.
    """
    if selection is None:
        if len(known) != 1:
            raise ValueError(f"{len(known)} {what}s are loaded ({', '.join(known) or 'none'}): say which one per row")
        selection = known[0]
    names = [selection] * rows if isinstance(selection, str) else list(selection)
    if len(names) != rows:
        raise ValueError(f"{what} selection has {len(names)} entries for a batch of {rows} rows")
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; loaded: {list(known)}")
    return names


def used_in_order(names: Sequence[Optional[str]], known: Sequence[str]) -> list[str]:
    """The distinct names of a batch, in load order (the order of the bank entries)."""
    present = {n for n in names if n is not None}
    return [n for n in known if n in present]


def name_matches(name: str, spec: Union[str, Sequence[str]]) -> bool:
    """Does module ``name`` match ``spec``: a full-match regex (str), or a list of names that match
    when equal or a ``.``-suffix (PEFT's ``target_modules`` rule)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)
